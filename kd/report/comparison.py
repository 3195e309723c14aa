"""Comparison tables and plots of finished stages: the end-of-run summary, report.md and report.png.

Stages are grouped by experiment and label (teacher, baseline, baseline (tuned, N trials), distill (loss));
a group with several seeds shows mean ± standard deviation. The headline top-1 is the last epoch's (the best
epoch is selected on val/ and shown as such). The gain of a distilled student is paired seed by seed with
each baseline of its experiment, each named ("baseline at --lr 0.05", "baseline tuned, 16 trials"), with a
95% interval over the seeds and the count of seeds it wins (:mod:`kd.report.confidence`).
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kd.errors import KDError  # noqa: E402
from kd.files import written_atomically  # noqa: E402
from kd.report.confidence import Gain, paired_gain, unpaired_gain  # noqa: E402
from kd.report.provenance import saved_config, settings_table  # noqa: E402
from kd.report.results import StageResult  # noqa: E402
from kd.tables import text_table  # noqa: E402
from kd.versions import missing_folders, remove_empty  # noqa: E402

Group = tuple[str, str]  # (experiment, label)
DISTILLED = ("distill", "generation", "ensemble")  # the stages a gain over the baseline is computed for


def _mean_std(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def group_results(results: list[StageResult]) -> dict[Group, list[StageResult]]:
    """Results grouped by (experiment, label), in first-seen order."""
    groups: dict[Group, list[StageResult]] = defaultdict(list)
    for result in results:
        groups[(result.experiment, result.label)].append(result)
    return dict(groups)


def baseline_name(runs: list[StageResult]) -> str:
    """A baseline group as a gain names it: ``baseline tuned, 16 trials``, or ``baseline at --lr 0.05`` (its flags'
    learning rate, as its config.yaml recorded it)."""
    if runs[0].tune_trials:
        return f"baseline tuned, {runs[0].tune_trials} trials"
    lr = (saved_config(runs[0].log_dir) or {}).get("lr")
    return f"baseline at --lr {lr:g}" if isinstance(lr, (int, float)) else "baseline"


def gains(groups: dict[Group, list[StageResult]]) -> dict[Group, dict[str, Gain]]:
    """The headline top-1 gain in points of each distill group over each baseline group of its experiment, paired
    seed by seed, by the baseline's name (:func:`baseline_name`); a tuned distill group is compared with a tuned
    baseline when there is one, an untuned group with an untuned one, and each with the other kind as well.

    Each side counts one run per seed (:func:`one_per_seed`); where the two share no seed, the gain is the
    difference of their means (no interval).
    """
    # Each baseline group once: its experiment, name (read from its config.yaml), whether tuned, top-1 by seed.
    baselines = [(experiment, baseline_name(group), bool(group[0].tune_trials),
                  {r.seed: r.top1 for r in one_per_seed(group)})
                 for (experiment, name), group in groups.items() if name.startswith("baseline")]
    out: dict[Group, dict[str, Gain]] = {}
    for (experiment, label), runs in groups.items():
        if not label.startswith(DISTILLED):
            continue
        tuned = bool(runs[0].tune_trials)
        students = one_per_seed(runs)
        ours = sorted((b for b in baselines if b[0] == experiment), key=lambda b: b[2] != tuned)  # same kind first
        for _, name, _, base_by_seed in ours:
            paired = [r.top1 - base_by_seed[r.seed] for r in students if r.seed in base_by_seed]
            out.setdefault((experiment, label), {})[name] = paired_gain(paired) if paired else (
                unpaired_gain(statistics.fmean(r.top1 for r in students) - statistics.fmean(base_by_seed.values())))
    return out


def one_per_seed(runs: list[StageResult]) -> list[StageResult]:
    """The newest run (highest ``version_N``) of each seed: a stage trained again without --resume is one sample of
    that seed, not a second one, so it may not narrow an interval."""
    def version(run: StageResult) -> int:
        number = run.log_dir.name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    newest: dict[int, StageResult] = {}
    for run in runs:
        if run.seed not in newest or version(run) > version(newest[run.seed]):
            newest[run.seed] = run
    return list(newest.values())


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def stage_table(results: list[StageResult], markdown: bool = False) -> str:
    """One row per trained stage, with where its logs and checkpoints are."""
    header = ("stage", "model", "seed", "top-1 %", "top-5 %", "best top-1 % on val/ (epoch)", "time",
              "logs and checkpoints")
    rows = [(r.label, r.arch, str(r.seed), f"{r.top1:.2f}", _shown(r.last_top5), f"{r.best_top1:.2f} ({r.best_epoch})",
             f"{r.seconds:.1f}s", str(r.log_dir)) for r in results]
    return text_table(header, rows, markdown)


def comparison_table(results: list[StageResult], markdown: bool = False) -> str:
    """One row per group: mean ± std over seeds of the last epoch's top-1 and top-5, the best epoch's top-1
    (selected on val/), time, and the gain over each baseline, with its interval and wins."""
    groups = group_results(results)
    gain = gains(groups)
    names = list(dict.fromkeys(name for by_baseline in gain.values() for name in by_baseline))
    many = len({experiment for experiment, _ in groups}) > 1
    header = ("run", "model", "params", "seeds", "top-1 %", "top-5 %", "best top-1 % on val/",
              *(f"gain over {name} (top-1 points)" for name in names), "time (s)")
    rows = []
    for (experiment, label), runs in groups.items():
        top5 = [r.last_top5 for r in runs if r.last_top5 is not None]
        rows.append((f"{experiment}/{label}" if many else label, runs[0].arch, f"{runs[0].params:,}",
                     " ".join(str(r.seed) for r in runs), _mean_std([r.top1 for r in runs]),
                     _mean_std(top5) if len(top5) == len(runs) else "-", _mean_std([r.best_top1 for r in runs]),
                     *(gain[(experiment, label)][name].short() if name in gain.get((experiment, label), {}) else ""
                       for name in names),
                     _mean_std([r.seconds for r in runs], 1)))
    return text_table(header, rows, markdown)


def ensemble_lines(results: list[StageResult], markdown: bool = False) -> list[str]:
    """For each stage distilled from an ensemble: the ensemble's validation top-1 and each teacher's own."""
    lines = []
    for r in results:
        if len(r.teachers) > 1:
            own = ", ".join(f"{t['arch']} {'-' if t['top1'] is None else format(t['top1'], '.2f')} %"
                            for t in r.teachers)
            seen = r.teacher_top1
            lines.append(f"{'- ' if markdown else ''}{r.label}, seed {r.seed}: an ensemble of {len(r.teachers)} "
                         f"teachers{'' if seen is None else f' ({seen:.2f} % top-1)'}; each alone: {own}")
    return lines


TEACHER_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 3)))  # one per teacher, then again


def _teacher_archs(runs: list[StageResult]) -> str:
    return "+".join(t.get("arch", "?") for t in runs[0].teachers)


def figure(results: list[StageResult]) -> Figure:
    """Validation top-1 per epoch of every student group, teachers' best as horizontal lines.

    Each group has its own colour; each teacher its own dash pattern. A group of several seeds draws
    its mean with a band of ± one standard deviation, both named in one legend entry. The legend
    sits right of the axes, where it covers no curve.
    """
    drawn, axes = plt.subplots(figsize=(11, 5), layout="constrained")
    groups = group_results(results)
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    many = len({experiment for experiment, _ in groups}) > 1
    handles, labels, teachers = [], [], 0
    for index, ((experiment, label), runs) in enumerate(groups.items()):
        name, colour = f"{experiment}/{label}" if many else label, colours[index % len(colours)]
        seeds = f"{len(runs)} seeds" if len(runs) > 1 else f"seed {runs[0].seed}"
        if label == "teacher" or label.startswith("ensemble"):  # no curve: one figure, drawn across
            best = statistics.fmean(r.best_top1 for r in runs)
            handles.append(axes.axhline(best, color=colour, linestyle=TEACHER_STYLES[teachers % len(TEACHER_STYLES)]))
            labels.append(f"{name}: {runs[0].arch}, best {best:.1f} %{' (mean)' if len(runs) > 1 else ''}, {seeds}")
            teachers += 1
            continue
        length = min(len(r.val_top1) for r in runs)
        epochs = range(length)  # 0-based, as in checkpoint names and Lightning's logs
        curves = [r.val_top1[:length] for r in runs]
        mean = [statistics.fmean(values) for values in zip(*curves)]
        (line,) = axes.plot(epochs, mean, color=colour, marker="o" if length == 1 else None)
        source = f" from {_teacher_archs(runs)}" if runs[0].teachers else ""
        if len(runs) > 1:
            spread = [statistics.stdev(values) for values in zip(*curves)]
            band = axes.fill_between(epochs, [m - s for m, s in zip(mean, spread)],
                                     [m + s for m, s in zip(mean, spread)], color=colour, alpha=0.2, linewidth=0)
            handles.append((line, band))
            labels.append(f"{name}: {runs[0].arch}{source}, mean ± std over {seeds}")
        else:
            handles.append(line)
            labels.append(f"{name}: {runs[0].arch}{source}, {seeds}")
    axes.set(xlabel="epoch (0 = the first)", ylabel="validation top-1 accuracy (%)",
             title="Validation accuracy with and without distillation")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small",
                handler_map={tuple: HandlerTuple(ndivide=1)})
    return drawn


def report_text(results: list[StageResult]) -> str:
    """report.md: the comparison, the plot, how each stage was trained, and each stage's own row."""
    ensembles = ensemble_lines(results, markdown=True)
    return "\n".join([
        "# kd report", "",
        "Validation top-1 and top-5 of each stage at its last epoch (mean ± standard deviation over seeds), and its",
        "best epoch's top-1, which val/ itself selected (so it is val/'s best draw, not an estimate). The gain is the",
        "distilled student's last-epoch top-1 minus each baseline's, paired seed by seed, with a 95% confidence",
        "interval (Student's t over the seeds' paired differences) and the seeds it wins.", "",
        comparison_table(results, markdown=True), "",
        "![validation top-1 per epoch](report.png)", "",
        "## How each stage was trained", "",
        "The teacher each stage learned from (an assistant's own teacher before the arrow; paths relative to the",
        "experiment folder), the softmax temperature, the loss weights in force, and the training settings.", "",
        settings_table(results, markdown=True), "",
        "## Stages", "",
        stage_table(results, markdown=True), "",
        *(["## Ensembles", "", *ensembles, ""] if ensembles else []),
    ])


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError in the block (a full disk, a read-only folder) as one line naming ``path`` and the reason."""
    try:
        yield
    except OSError as exc:
        raise KDError(f"report: cannot write {path}: {exc.strerror or exc}; no partial report is left") from None


def write_report(results: list[StageResult], folder: Path) -> Path:
    """Write report.md (tables) and report.png (curves) into ``folder``, all or nothing; returns report.md's path.

    ``folder`` is new, or empty: claimed for this report (:func:`kd.versions.claimed_version`). It is filled under
    a temporary name, then renamed. When a write fails (a full disk), nothing is left, not even the empty folders
    made for the report, and the KDError names the file and why.
    """
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise KDError(f"report: {folder} already exists; a report is never written over")
    made = missing_folders(folder.parent)
    text, drawn = report_text(results), figure(results)
    try:
        with _writing(folder):
            folder.parent.mkdir(parents=True, exist_ok=True)
            with written_atomically(folder) as tmp:
                tmp.mkdir()
                with _writing(folder / "report.png"):
                    drawn.savefig(tmp / "report.png", dpi=120, format="png")
                with _writing(folder / "report.md"):
                    (tmp / "report.md").write_text(text)
    except KDError:
        remove_empty(made)
        raise
    finally:
        plt.close(drawn)
    return folder / "report.md"
