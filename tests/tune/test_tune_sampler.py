"""--tune never tries settings twice: not after --resume, not with a longer --tune, not from a second process on
the study; and one process with one seed makes the same study twice."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FAST
from kd.cli import main
from kd.config import Config
from kd.tune.search import open_study
from kd.tune.space import paper_point, search_space
from kd.tune.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # kd asks trials itself

SPACE = search_space(Config(distill=True, teacher_checkpoint=["t.ckpt"]))


def _study(path: Path, seed: int = 0, trials: int = 4) -> optuna.Study:
    """The study of a tune of ``trials`` trials as one kd process opens it (its paper point enqueued, as kd does)."""
    study = open_study(open_storage(f"sqlite:///{path}"), "kd-test", seed, trials, epochs=1)
    study.enqueue_trial(paper_point(Config(distill=True), SPACE), skip_if_exists=True)
    return study


def _ask(study: optuna.Study) -> optuna.Trial:
    """A new trial with its settings drawn, as a tune's trial draws them before it trains."""
    trial = study.ask()
    for name, r in SPACE.items():
        trial.suggest_float(name, r.low, r.high, log=r.log)
    return trial


def _run(study: optuna.Study, n: int) -> None:
    """Run ``n`` trials, each scored by its first setting (any score that follows the settings will do)."""
    for _ in range(n):
        trial = _ask(study)
        study.tell(trial, next(iter(trial.params.values())))


def _settings(study: optuna.Study) -> list[tuple[float, ...]]:
    return [tuple(t.params.values()) for t in study.trials if t.params]


def test_one_process_with_one_seed_makes_the_same_study_twice(tmp_path):
    first, second = _study(tmp_path / "a.db"), _study(tmp_path / "b.db")
    _run(first, 6)  # past TPE's 4 random start-up trials
    _run(second, 6)
    assert _settings(first) == _settings(second) and len(set(_settings(first))) == 6
    third = _study(tmp_path / "c.db", seed=1)
    _run(third, 6)
    assert _settings(third)[0] == _settings(first)[0] and set(_settings(third)[1:]).isdisjoint(_settings(first))


def test_a_tune_resumed_after_a_kill_tries_new_settings(tmp_path):
    killed = _study(tmp_path / "s.db")
    _run(killed, 2)
    _ask(killed)  # trial 2 was training when the process was killed: the resumed tune fails it
    resumed = _study(tmp_path / "s.db")
    resumed.tell(2, state=TrialState.FAIL)
    _run(resumed, 2)
    tried = _settings(resumed)
    assert len(tried) == 5 and len(set(tried)) == 5  # before: trial 3 repeated trial 1


def test_a_finished_tune_made_longer_tries_new_settings(tmp_path):
    _run(_study(tmp_path / "s.db", trials=2), 2)
    longer = _study(tmp_path / "s.db", trials=4)
    _run(longer, 2)
    tried = _settings(longer)
    assert len(tried) == 4 and len(set(tried)) == 4  # before: trial 2 repeated trial 1


def test_two_processes_on_one_study_try_different_settings(tmp_path):
    one, two = _study(tmp_path / "s.db"), _study(tmp_path / "s.db")
    asked = [_ask(study) for study in (one, two, one, two, two, one)]  # as each process takes its next trial
    for trial, study in zip(asked, (one, two, one, two, two, one)):
        study.tell(trial, 1.0)
    tried = _settings(one)
    assert len(tried) == 6 and len(set(tried)) == 6  # before: each process drew the other's settings


def test_tune_2_then_tune_4_with_resume_never_repeats_a_trial(tiny_data, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "runs"), "--train_teacher",
             "--distill", "--tune_epochs", "1"]
    assert main([*flags, "--tune", "2"]) == 0
    assert main([*flags, "--tune", "4", "--resume"]) == 0
    url = f"sqlite:///{tmp_path / 'runs' / 'kd' / 'tune' / 'study.db'}"
    (name,) = optuna.get_all_study_names(url)
    tried = _settings(optuna.load_study(study_name=name, storage=url))
    assert len(tried) == 4 and len(set(tried)) == 4  # before: trial 2 was trial 1 again
