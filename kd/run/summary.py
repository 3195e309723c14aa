"""What a run tells at its end: the summary table, gains and warnings, the report, and ``--report`` over old runs."""

from __future__ import annotations

from pathlib import Path

from kd.config import Config
from kd.report.comparison import comparison_table, ensemble_lines, gains, group_results, stage_table, write_report
from kd.report.results import StageResult, find_results
from kd.versions import claimed_version


def format_summary(results: list[StageResult], report: Path | None = None) -> str:
    """The end-of-run text: one row per stage (top-1 and top-5 at the last epoch; the best epoch's top-1, selected on
    val/, beside them), the distillation gain over each baseline with its interval, and where everything is."""
    lines = [stage_table(results)]
    groups = group_results(results)
    for (_, label), by_baseline in gains(groups).items():
        lines += [f"{label} gain over the {name}: {gain.sentence()}" for name, gain in by_baseline.items()]
    if any(len(runs) > 1 for runs in groups.values()):
        lines += ["", comparison_table(results)]
    lines += ensemble_lines(results)
    warned = [f"warning: {r.label}, seed {r.seed}: {warning}" for r in results for warning in r.warnings]
    lines += ["", *warned] if warned else []
    if report is not None:
        lines.append(f"report: {report} (and report.png beside it)")
    lines.append("each stage's best and last checkpoints are in <logs>/checkpoints; "
                 "view the logs with: tensorboard --logdir " + str(results[0].log_dir.parent.parent))
    return "\n".join(lines)


def _write_report(results: list[StageResult], config: Config) -> Path:
    """The report of ``results`` in a new version folder of the experiment's ``report/``, claimed for it: two runs
    finishing at once into one experiment each write their own; a failed write leaves no folder."""
    with claimed_version(Path(config.output_dir) / config.experiment_name / "report") as folder:
        return write_report(results, folder)


def report_and_summary(results: list[StageResult], config: Config) -> Path | None:
    """Write the report when there are two stages or more, then print the summary; returns report.md's path.

    The summary is printed even when the report cannot be written (a full disk), before that error.
    """
    report = None
    try:
        report = _write_report(results, config) if len(results) > 1 else None
    finally:
        print("\n" + format_summary(results, report), flush=True)
    return report


def compare_runs(config: Config) -> Path:
    """``--report DIR ...``: one table and one plot of every finished stage under the folders, no training."""
    results = find_results(config.report)
    print(comparison_table(results), flush=True)  # first: it stands even if the report cannot be written
    report = _write_report(results, config)
    print(f"report: {report} (and report.png beside it)", flush=True)
    return report
