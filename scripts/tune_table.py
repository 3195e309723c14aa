"""What --tune buys on the digits preset: five methods at their papers' defaults and tuned, over three seeds.

Trains the digits teacher once and the label-only baseline for each seed, then for each method the
distill stage at the papers' defaults for each seed, and a ``--tune`` (tuned once, with the first
seed) followed by the distill stage for each seed with the best settings. Before each tune it trains
one more baseline stage (seed 0) as a clock, so that each tune's wall time is a multiple of a baseline
timed in the same window of this shared machine. Prints the table after each method.

    python scripts/make_digits.py data/digits
    python scripts/tune_table.py                          # 5 methods, seeds 0 1 2, 16 trials of 10 epochs
    python scripts/tune_table.py --methods kl_softmax --seeds 0 --trials 3 --tune_epochs 2

Re-running continues where it stopped (every call passes --resume).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from methods import LAST_MAP, MAPS, method_parser, run

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
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
    """Best top-1 by seed of the finished ``stage`` runs under ``folder``."""
    return {r.seed: r.best_top1 for r in find_results([folder]) if r.stage == stage}


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


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
    run(*seeds, "--experiment_name", "tune_table", "--train_teacher", "--baseline", "--distill", "false")
    teacher = out / "tune_table" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    baseline = top1(out / "tune_table", "baseline")
    rows = ["| method | gain at defaults | gain tuned | tune time / baseline stage |", "| --- | --- | --- | --- |"]
    for method in args.methods:
        distill = [*seeds, "--train_teacher", "false", "--baseline", "false", "--distill", "--teacher_checkpoint",
                   str(teacher), "--kd_loss", method, *METHODS[method]]
        if method in LOGIT:
            distill += ["--teacher_cache", str(out / "tune_table_cache")]
        run(*distill, "--experiment_name", f"tune_table_{method}")
        run(*common, "--seed", args.seeds[0], "--experiment_name", f"tune_table_clock_{method}",
            "--train_teacher", "false", "--baseline", "--distill", "false")
        run(*distill, "--experiment_name", f"tune_table_{method}_tuned", "--tune", args.trials,
            "--tune_epochs", args.tune_epochs)
        clock = next(r.seconds for r in find_results([out / f"tune_table_clock_{method}"]))
        reports = sorted((out / f"tune_table_{method}_tuned" / "tune" / "report").glob("version_*/tune.json"),
                         key=lambda p: int(p.parent.name.removeprefix("version_")))
        tune = json.loads(reports[0].read_text())
        gains = [[runs[s] - baseline[s] for s in baseline]
                 for runs in (top1(out / f"tune_table_{method}", "distill"),
                              top1(out / f"tune_table_{method}_tuned", "distill"))]
        rows.append(f"| {method} | {spread(gains[0])} | {spread(gains[1])} | "
                    f"{tune['seconds'] / clock:.1f}x ({tune['seconds']:.0f} s / {clock:.0f} s) |")
        print(f"\nbaseline top-1 by seed: {baseline}\n" + "\n".join(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
