"""Reproduce one row of the CIFAR-100 tables of RepDistiller and mdistiller and compare kd's top-1 with theirs.

A row is PAIR/METHOD, the preset configs/cifar100/PAIR/METHOD.yaml. kd trains the pair's teacher, the
student on labels alone and the student distilled with the method, with the presets
configs/cifar100/recipe.yaml, configs/cifar100/PAIR.yaml and the row's, and with --resume: a stage that an
earlier run with the same flags finished is reused (the teacher and the baseline are shared by every
method of a pair). It then prints kd's top-1 beside the published figure (configs/cifar100/published.yaml).

    python scripts/reproduce.py res32x4_res8x4/dkd --seeds 0 1 2 --accelerator gpu --precision bf16-mixed
    python scripts/reproduce.py res32x4_res8x4/dkd --teacher_checkpoint resnet32x4_vanilla/ckpt_epoch_240.pth
    python scripts/reproduce.py res56_res20/kl_softmax --epochs 1     # a smoke test of the whole row

Give the row first; every flag this script does not define goes to kd as it is (--epochs, --accelerator,
--precision, --output_dir, --download_data, ...).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing kd
from kd.cli import main as kd_main  # noqa: E402
from kd.config import Config, Role  # noqa: E402
from kd.flags import resolve  # noqa: E402
from kd.registry import did_you_mean  # noqa: E402
from kd.report.results import StageResult, find_results  # noqa: E402
from kd.tables import text_table  # noqa: E402

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "cifar100"
PUBLISHED = PRESETS / "published.yaml"
ROWS = sorted(f"{path.parent.name}/{path.stem}" for path in PRESETS.glob("*/*.yaml"))
# The column of published.yaml that each kd stage of a row is compared with (the distill stage's: the method's).
PUBLISHED_COLUMN = {"teacher": "teacher", "baseline": "student"}


def rows_help() -> str:
    """The rows, one line per pair: the --help epilogue."""
    methods: dict[str, list[str]] = defaultdict(list)
    for row in ROWS:
        pair, method = row.split("/")
        methods[pair].append(method)
    lines = [f"  {pair + '/':<18}{' '.join(names)}" for pair, names in methods.items()]
    return "\n".join(["rows (PAIR/METHOD):", *lines])


def parser() -> argparse.ArgumentParser:
    """The command line: a row, the flags this script adds, and any kd flag after them."""
    parse = argparse.ArgumentParser(prog="python scripts/reproduce.py", description=__doc__,
                                    epilog=rows_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                    allow_abbrev=False)
    parse.add_argument("row", help="PAIR/METHOD, e.g. res32x4_res8x4/dkd (listed below)")
    parse.add_argument("--seeds", nargs="+", metavar="SEED",
                       help="train the baseline and the distilled student once per seed (default: seed 0)")
    parse.add_argument("--teacher_checkpoint", metavar="FILE", nargs="+",
                       help="distill from this teacher instead of training one: a kd checkpoint, or a teacher that "
                            "RepDistiller or mdistiller released (ckpt_epoch_240.pth); several: their ensemble")
    parse.add_argument("--data", metavar="ROOT", help="the folder holding cifar-100-python/ (default: data; "
                                                      "add --download_data to fetch it there)")
    return parse


def presets(row: str) -> list[Path]:
    """The presets of ``row``, in the order they layer: the recipe, the pair, the method."""
    pair = row.split("/")[0]
    return [PRESETS / "recipe.yaml", PRESETS / f"{pair}.yaml", PRESETS / f"{row}.yaml"]


def kd_arguments(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """kd's command line for the row: its presets, --resume, this script's flags translated, then ``extra``."""
    argv = ["--flags_file", "none", "--config", *(os.path.relpath(path) for path in presets(args.row)), "--resume"]
    if args.data:
        argv += ["--data_dir", f"torchvision:CIFAR100:{args.data}"]
    if args.seeds:
        argv += ["--seeds", *args.seeds]
    if args.teacher_checkpoint:
        argv += ["--teacher_checkpoint", *args.teacher_checkpoint, "--train_teacher", "false"]
    return argv + extra


def _version(result: StageResult) -> int:
    return int(result.log_dir.name.removeprefix("version_"))


def _matches(result: StageResult, config: Config, role: Role, teacher: list[str]) -> bool:
    """Whether ``result`` was trained with ``config``'s flags of ``role``, as --resume compares them.

    ``teacher`` is the checkpoint(s) a distill stage records as its --teacher_checkpoint (no other role has it).
    """
    saved = result.log_dir / "config.yaml"
    if not saved.is_file():
        return False
    values = yaml.safe_load(saved.read_text()) or {}
    from kd.run.plan import saved_identity, with_weights_in_force  # imported here: they load the losses

    stage_config = replace(config, seed=result.seed, teacher_checkpoint=teacher)
    if role is Role.DISTILL:
        stage_config = with_weights_in_force(stage_config)
    return saved_identity(values, stage_config, role) == stage_config.identity(role)


def row_results(config: Config) -> dict[str, list[StageResult]]:
    """This run's stages by kd stage: per seed, the latest one with this run's flags (the one --resume reused).

    The experiment folder also holds the pair's other methods and runs with other flags. A distilled
    student must also have learnt from this run's teacher: the one given, or the teacher stage picked here.
    """
    from kd.run.plan import stage_role  # imported here: it loads torch, which --help does without

    found = find_results([str(Path(config.output_dir) / config.experiment_name)])
    seeds = config.seeds or [config.seed]

    def latest(stage: str, stage_seeds: list[int], teachers: list[list[str]]) -> list[StageResult]:
        picked = []
        for seed in stage_seeds:
            same = [r for r in found if r.stage == stage and r.seed == seed
                    and any(_matches(r, config, stage_role(stage), teacher) for teacher in teachers)]
            picked += [max(same, key=_version)] if same else []
        return picked

    if config.teacher_checkpoint:
        teacher_runs, teachers = [], [[str(Path(path).expanduser().resolve()) for path in config.teacher_checkpoint]]
    else:
        teacher_runs = latest("teacher", seeds if config.repeat_teacher else seeds[:1], [[]])
        teachers = [[str(r.best_checkpoint.resolve())] for r in teacher_runs]
    return {"teacher": teacher_runs, "baseline": latest("baseline", seeds, [[]]),
            "distill": latest("distill", seeds, teachers)}


def comparison(row: str, config: Config, results: dict[str, list[StageResult]], published: dict) -> str:
    """kd's top-1 (last epoch, and the best epoch, which val/ selected) of each run of the row beside the published
    figure, and the difference of each with it: sources differ in which of the two they print (published.yaml)."""
    from kd.report.comparison import _mean_std  # kd's mean ± std, as its own tables show it (imported here: matplotlib)

    pair, method = row.split("/")
    figures = published["figures"][pair]
    archs = {"teacher": " ".join(config.teacher_arch), "baseline": config.student_arch,
             "distill": config.student_arch}
    rows, columns = [], []
    for stage in ("teacher", "baseline", "distill"):
        column = PUBLISHED_COLUMN.get(stage, method)
        columns.append(column)
        runs, figure = results[stage], figures[column]
        label = f"distill ({method})" if stage == "distill" else stage
        if not runs:
            given = stage == "teacher" and config.teacher_checkpoint
            rows.append((label, archs[stage], "", "given" if given else "not found", "", f"{figure:.2f}", "", ""))
            continue
        last, best = [r.top1 for r in runs], [r.best_top1 for r in runs]
        rows.append((label, archs[stage], " ".join(str(r.seed) for r in runs), _mean_std(last), _mean_std(best),
                     f"{figure:.2f}", *(f"{statistics.fmean(top1) - figure:+.2f}" for top1 in (last, best))))
    header = ("run", "model", "seeds", "kd top-1 % (last)", "kd top-1 % (best on val/)", "published %",
              "last - published", "best - published")
    sources: dict[str, list[str]] = defaultdict(list)
    for column in columns:
        sources[published["sources"][column]].append(column)
    notes = [f"published ({', '.join(names)}): {source}" for source, names in sources.items()]
    if config.teacher_checkpoint:
        notes.append(f"teacher: given, {' '.join(config.teacher_checkpoint)} (not trained in this run)")
    return "\n".join([f"row {row}: kd against the published CIFAR-100 top-1", text_table(header, rows), *notes])


def main(argv: list[str] | None = None) -> int:
    """Run the row through kd (training or reusing each stage), then print the comparison; the exit code."""
    args, extra = parser().parse_known_args(argv)
    if args.row not in ROWS:
        print(f"error: row {args.row!r} is not one of configs/cifar100/PAIR/METHOD.yaml"
              f"{did_you_mean(args.row, ROWS)}; --help lists the rows", file=sys.stderr)
        return 2
    kd_argv = kd_arguments(args, extra)
    print("$ python experiment.py " + shlex.join(kd_argv), flush=True)
    code = kd_main(kd_argv)
    if code != 0:
        return code
    config = resolve(kd_argv).config
    print("\n" + comparison(args.row, config, row_results(config), yaml.safe_load(PUBLISHED.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
