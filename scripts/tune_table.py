"""What --tune buys on the digits preset: five methods at their papers' defaults and tuned, over three seeds,
against the baseline at the preset's flags and the baseline tuned with the same budget.

Trains the digits teacher once and the label-only baseline for each seed; then the baseline tuned (``--tune``,
tuned once with the first seed, over the learning rate, weight decay and label smoothing) for each seed; then for
each method the distill stage at the papers' defaults for each seed, and a ``--tune`` (the same trials, epochs,
sampler seed and pruner, over the method's settings and the same training settings) followed by the distill stage
for each seed with the best settings. Before each tune it trains one more baseline stage (seed 0) as a clock, so
that each tune's wall time is a multiple of a baseline timed in the same window of this machine. Gains are paired
seed by seed on the last epoch's top-1, with a 95% Student's t interval and the seeds won. Prints the table after
each method.

    python scripts/make_digits.py data/digits
    python scripts/tune_table.py                          # 5 methods, seeds 0 1 2, 16 trials of 10 epochs
    python scripts/tune_table.py --methods kl_softmax --seeds 0 --trials 3 --tune_epochs 2

Re-running continues where it stopped (every call passes --resume).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from methods import LAST_MAP, MAPS, method_parser, run

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from kd.report.confidence import paired_gain  # noqa: E402
from kd.report.results import find_results  # noqa: E402

METHODS = {
    "kl_softmax": [],
    "dist": [],
    # The paper warms up over 20 of 240 epochs; digits trains 40, so 4 keeps that share.
    "dkd": ["--loss_options", "dkd.warmup=4"],
    "fitnets": LAST_MAP,
    "at": MAPS,
}
LOGIT = {"kl_softmax", "dist", "dkd"}


def top1(folder: Path, stage: str) -> dict[int, float]:
    """The headline (last-epoch) top-1 by seed of the finished ``stage`` runs under ``folder``."""
    return {r.seed: r.top1 for r in find_results([folder]) if r.stage == stage}


def gain(runs: dict[int, float], baseline: dict[int, float]) -> str:
    """The paired gain of ``runs`` over ``baseline``, seed by seed, with its interval and wins."""
    return paired_gain([runs[seed] - baseline[seed] for seed in baseline]).short()


def tune_seconds(folder: Path) -> float:
    """The wall time of the first tune whose report lies under ``folder`` (its ``report/version_0``)."""
    return json.loads((folder / "report" / "version_0" / "tune.json").read_text())["seconds"]


def clock(out: Path, common: list[str], seed: str, name: str) -> float:
    """The seconds of one baseline stage trained now (seed ``seed``), the unit of a tune's time."""
    run(*common, "--seed", seed, "--experiment_name", name, "--train_teacher", "false", "--baseline",
        "--distill", "false")
    return next(r.seconds for r in find_results([out / name]))


def main() -> None:
    parser = method_parser(__doc__, list(METHODS))
    parser.add_argument("--trials", default="16")
    parser.add_argument("--tune_epochs", default="10")
    parser.add_argument("--epochs", help="epochs of every stage instead of the preset's 40 (for a busy machine)")
    parser.add_argument("--image_cache", help="decode the images once into this folder (faster epochs)")
    args = parser.parse_args()
    out = PROJECT / args.output_dir
    common = ["--config", "configs/digits.yaml", "--output_dir", args.output_dir,
              *(["--epochs", args.epochs] if args.epochs else []),
              *(["--image_cache", args.image_cache] if args.image_cache else [])]
    seeds = ["--seeds", *args.seeds, *common]
    tune = ["--tune", args.trials, "--tune_epochs", args.tune_epochs]
    run(*seeds, "--experiment_name", "tune_table", "--train_teacher", "--baseline", "--distill", "false")
    teacher = out / "tune_table" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    baseline = top1(out / "tune_table", "baseline")
    seconds = clock(out, common, args.seeds[0], "tune_table_clock_baseline")
    run(*seeds, "--experiment_name", "tune_table_baseline_tuned", "--train_teacher", "false", "--baseline",
        "--distill", "false", *tune)
    tuned_baseline = top1(out / "tune_table_baseline_tuned", "baseline")
    spent = tune_seconds(out / "tune_table_baseline_tuned" / "tune" / "baseline")
    rows = ["| method | gain at defaults over the baseline at the preset's flags | gain tuned over the baseline at the "
            "preset's flags | gain tuned over the baseline tuned | tune time / baseline stage |",
            "| --- | --- | --- | --- | --- |",
            f"| (none: the baseline tuned) | | {gain(tuned_baseline, baseline)} | | {spent / seconds:.1f}x "
            f"({spent:.0f} s / {seconds:.0f} s) |"]
    for method in args.methods:
        distill = [*seeds, "--train_teacher", "false", "--baseline", "false", "--distill", "--teacher_checkpoint",
                   str(teacher), "--kd_loss", method, *METHODS[method]]
        if method in LOGIT:
            distill += ["--teacher_cache", str(out / "tune_table_cache")]
        run(*distill, "--experiment_name", f"tune_table_{method}")
        seconds = clock(out, common, args.seeds[0], f"tune_table_clock_{method}")
        run(*distill, "--experiment_name", f"tune_table_{method}_tuned", *tune)
        spent = tune_seconds(out / f"tune_table_{method}_tuned" / "tune")
        defaults, tuned = (top1(out / f"tune_table_{method}{suffix}", "distill") for suffix in ("", "_tuned"))
        rows.append(f"| {method} | {gain(defaults, baseline)} | {gain(tuned, baseline)} | "
                    f"{gain(tuned, tuned_baseline)} | {spent / seconds:.1f}x ({spent:.0f} s / {seconds:.0f} s) |")
        print(f"\nbaseline top-1 by seed: {baseline}; tuned: {tuned_baseline}\n" + "\n".join(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
