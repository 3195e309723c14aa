"""The report of a --tune: ``tune.md`` (trials, best settings, importances), ``tune.png``, the ``best.yaml`` preset."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import optuna  # noqa: E402
from optuna.importance import PedAnovaImportanceEvaluator  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from kd.config import Config, save_config  # noqa: E402
from kd.files import write_text, written_atomically  # noqa: E402
from kd.losses.base import Range  # noqa: E402
from kd.tune.space import rounded  # noqa: E402


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's PED-ANOVA parameter importances over the finished trials; empty when too few finished to say."""
    try:
        with few_trials_quiet():
            return optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError):
        return {}


@contextmanager
def few_trials_quiet() -> Iterator[None]:
    """Without PED-ANOVA's warning that a study of few trials gives every setting the same importance."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*quantiles select the same set of trials.*")
        yield


def _figure_pixels(axes: object) -> object:
    """The pixels of the figure an Optuna matplotlib plot drew into, closing it."""
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    return plt.imread(buffer)


def papers_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The trial of the flags' and papers' values: the one the tune enqueued first, whatever its state."""
    return next((t for t in trials if "fixed_params" in t.system_attrs), None)


def write_png(study: optuna.Study, chosen: dict[str, float], weights: dict[str, float], path: Path) -> None:
    """Optuna's optimisation history and the parameter importances (when ``weights`` has them) side by side, and
    the chosen settings as text."""
    from optuna.visualization import matplotlib as optuna_plots
    with warnings.catch_warnings(), few_trials_quiet():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        panels = [_figure_pixels(optuna_plots.plot_optimization_history(study))]
        if weights:
            panels.append(_figure_pixels(optuna_plots.plot_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator())))
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * len(panels) + 4, 4.5),
                                gridspec_kw={"width_ratios": [3] * len(panels) + [2]})
    for ax, pixels in zip(axes, panels):
        ax.imshow(pixels)
        ax.axis("off")
    axes[-1].axis("off")
    axes[-1].text(0, 0.5, "chosen settings\n\n" + "\n".join(f"{k} = {v:g}" for k, v in chosen.items()),
                  va="center", family="monospace")
    figure.tight_layout()
    with written_atomically(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def write_tune_report(study: optuna.Study, space: dict[str, Range], preset: Config, trial: FrozenTrial, why: str,
                      folder: Path, seconds: float) -> Path:
    """Write ``tune.md``, ``tune.png``, ``best.yaml`` (``preset``: the final run, with the chosen ``trial``'s
    settings; ``why`` it is not the best one, if so) and the figures as ``tune.json`` into ``folder``, an empty one
    claimed for this report (:func:`kd.versions.claimed_version`)."""
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = study.best_trial
    paper = papers_trial(trials)
    stage = f"the distill stage ({' + '.join(preset.kd_loss)})" if preset.distill else "the baseline"
    lines = [f"# Tune of {stage}", "",
             f"Study `{study.study_name}`: {sum(t.state == TrialState.COMPLETE for t in trials)} trials finished and "
             f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, scored by their best top-1 on the tuning "
             f"slice ({preset.tune_fraction:g} of each class of the training set); this process took {seconds:.1f} s.",
             "", f"Best: trial {best.number}, slice top-1 {best.value:.2f}%"
             + (f" (the flags' and papers' values, trial {paper.number}: {paper.value:.2f}%"
                f"{', pruned' if paper.state == TrialState.PRUNED else ''})" if paper is not None else "") + ".",
             *(["", f"Chosen: trial {trial.number}, {why}."] if why else []),
             "", "| setting | range | chosen |", "| --- | --- | --- |"]
    chosen = rounded(trial.params)
    lines += [f"| {name} | {r.low:g} to {r.high:g}{' (log)' if r.log else ''} | {chosen[name]:g} |"
              for name, r in space.items()]
    weights = importances(study)
    if weights:
        lines += ["", "Importance (Optuna's PED-ANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())]
    lines += ["", "| trial | state | epochs | slice top-1 % | settings |", "| --- | --- | --- | --- | --- |"]
    for t in trials:
        value = t.value if t.value is not None else t.intermediate_values.get(max(t.intermediate_values, default=0))
        lines.append(f"| {t.number} | {t.state.name.lower()} | {len(t.intermediate_values)} | "
                     f"{'' if value is None else f'{value:.2f}'} | "
                     f"{', '.join(f'{k}={v:g}' for k, v in rounded(t.params).items())} |")
    lines += ["", "`python experiment.py --config best.yaml` repeats the tuned stage with the chosen settings.", ""]
    save_config(preset, folder / "best.yaml")
    write_text(folder / "tune.json", json.dumps({
        "study": study.study_name, "seconds": seconds, "best_trial": best.number, "best_slice_top1": best.value,
        "best": rounded(best.params), "chosen_trial": trial.number, "chosen": chosen, "why": why,
        "paper_slice_top1": paper.value if paper is not None else None,
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params}
                   for t in trials]}, indent=1))
    write_png(study, chosen, weights, folder / "tune.png")
    write_text(folder / "tune.md", "\n".join(lines))
    return folder / "tune.md"
