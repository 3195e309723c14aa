"""--tune: the search spaces, the held-out slice, the refusals, and tunes end to end (resumed, shared)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from conftest import FAST, PROJECT, run_cli
from kd.cli import main
from kd.config import Config, Role
from kd.data.loaders import make_datamodule
from kd.errors import KDError
from kd.losses import LOSSES
from kd.losses.base import Range
from kd.losses.objective import build_objective
from kd.losses.spec import losses_in_force
from kd.tune.search import SliceScore, chosen_trial, fail_orphans
from kd.tune.slice import tuning_split
from kd.losses.spec import paper_value
from kd.tune.space import paper_point, search_space, settings_at

SPACED = [name for name in LOSSES.names() if getattr(LOSSES.get(name), "space", {})]


@pytest.mark.parametrize("name", SPACED)
def test_each_space_holds_the_papers_values(name):
    loss = LOSSES.get(name)
    for setting, bounds in loss.space.items():
        assert bounds.low < bounds.high and (bounds.low > 0 or not bounds.log)
        assert bounds.low <= paper_value(loss, setting) <= bounds.high, f"{name}.{setting}"


TRAINING = {"lr", "weight_decay", "label_smoothing"}


def test_the_logit_methods_search_weight_ce_weight_temperature_and_their_own_settings():
    assert set(search_space(Config(kd_loss=["dkd"]))) == {"ce_weight", "dkd.weight", "dkd.temperature", "dkd.alpha",
                                                           "dkd.beta", *TRAINING}
    assert {"dist.beta", "dist.gamma"} <= set(search_space(Config(kd_loss=["dist"])))
    assert set(search_space(Config(kd_loss=["kl_softmax"]))) == {"kl_softmax.weight", "kl_softmax.temperature",
                                                                  *TRAINING}


def test_the_baseline_searches_the_same_training_ranges_as_the_distill_stage():
    """Neither tuned stage has a training dimension the other lacks; the baseline searches nothing else."""
    c = Config(kd_loss=["dkd"], lr=0.1, weight_decay=1e-4, distill=True, baseline=True)
    baseline, distill = search_space(c, Role.BASELINE), search_space(c, Role.DISTILL)
    assert set(baseline) == TRAINING and {name: distill[name] for name in TRAINING} == baseline
    assert baseline["lr"] == Range(0.02, 0.5, log=True) and baseline["weight_decay"] == Range(1e-5, 1e-3, log=True)
    assert baseline["label_smoothing"] == Range(0.0, 0.2)
    assert "weight_decay" not in search_space(replace(c, weight_decay=0.0), Role.BASELINE)  # no decay asked for
    assert paper_point(c, baseline) == {"lr": 0.1, "weight_decay": 1e-4, "label_smoothing": 0.0}
    tuned = settings_at(c, {"lr": 0.0712345, "weight_decay": 2e-4, "label_smoothing": 0.05})
    assert (tuned.lr, tuned.weight_decay, tuned.label_smoothing) == (0.07123, 2e-4, 0.05)
    assert (tuned.kd_weights, tuned.ce_weight, tuned.loss_options) == (c.kd_weights, c.ce_weight, c.loss_options)
    narrowed = replace(c, tune_space=["lr=0.05:0.2:log", "dkd.beta=1:4"])
    assert search_space(narrowed, Role.BASELINE)["lr"] == Range(0.05, 0.2, log=True)
    assert "dkd.beta" not in search_space(narrowed, Role.BASELINE)  # left to the distill stage
    with pytest.raises(KDError, match="no setting dkd.beta to search"):
        search_space(replace(narrowed, distill=False), Role.BASELINE)


def test_kl_softmax_searched_alone_keeps_hintons_total_weight():
    """Its weight is alpha and the CE weight 1 - alpha, so the tune cannot raise the learning rate through them."""
    c = Config(kd_loss=["kl_softmax"])
    tuned = settings_at(c, {"kl_softmax.weight": 0.7, "kl_softmax.temperature": 2.0})
    assert tuned.kd_weights == [0.7] and tuned.ce_weight == 0.3
    assert settings_at(Config(kd_loss=["kl_softmax"], ce_weight=0.5), {"kl_softmax.weight": 0.7}).ce_weight == 0.5
    both = Config(kd_loss=["kl_softmax", "dkd"])
    assert "ce_weight" in search_space(both)  # DKD's CE range decides the CE weight of the pair
    assert settings_at(both, {"ce_weight": 0.4, "kl_softmax.weight": 0.7}).ce_weight == 0.4
    for name in SPACED:
        loss = LOSSES.get(name)
        if loss.share_of_total:
            assert loss.space["weight"].high < paper_value(loss, "weight") + paper_value(loss, "ce_weight")
    with pytest.raises(KDError, match="kl_softmax.weight is its share of the papers' total weight 1"):
        search_space(Config(kd_loss=["kl_softmax"], tune_space=["kl_softmax.weight=0.5:1.5"]))


def test_settings_fixed_by_flags_are_not_searched():
    c = Config(kd_loss=["kl_softmax", "dkd"], kd_weights=[1.0, 1.0], temperature=3.0, loss_options=["dkd.beta=4"])
    assert set(search_space(c)) == {"ce_weight", "dkd.alpha", *TRAINING}
    fixed = Config(kd_loss=["kl_softmax"], kd_weights=[1.0], ce_weight=0.5, temperature=2.0)
    assert set(search_space(fixed)) == TRAINING  # the training settings are still searched


def test_tune_space_replaces_a_range():
    space = search_space(Config(kd_loss=["dkd"], tune_space=["dkd.temperature=2:8:log", "ce_weight=0.2:0.5"]))
    assert (space["dkd.temperature"].low, space["dkd.temperature"].high) == (2, 8)
    assert space["dkd.temperature"].log and not space["ce_weight"].log


@pytest.mark.parametrize("option, message", [
    ("kl_softmax.tempreature=1:8", "no setting kl_softmax.tempreature to search.*did you mean"),
    ("dkd.beta=1:8", "no setting dkd.beta"),
    ("kl_softmax.temperature=8:1", "is empty"),
    ("kl_softmax.temperature=4:4", "is empty"),
    ("kl_softmax.temperature=0:4:log", "log range must start above 0"),
    ("kl_softmax.temperature=1-8", "expected NAME.SETTING=LOW:HIGH"),
])
def test_bad_tune_space_is_one_clear_error(option, message):
    with pytest.raises(KDError, match=message):
        search_space(Config(tune_space=[option]))


def test_a_point_becomes_flags_that_build_the_objective():
    c = Config(kd_loss=["dkd"], loss_options=["dkd.warmup=4"])
    tuned = settings_at(c, {"ce_weight": 0.5, "dkd.weight": 2.0, "dkd.beta": 3.123456, "dkd.temperature": 2.0})
    assert tuned.kd_weights == [2.0] and tuned.ce_weight == 0.5
    assert tuned.loss_options == ["dkd.warmup=4", "dkd.beta=3.123", "dkd.temperature=2"]
    objective = build_objective(losses_in_force(tuned.kd_loss, tuned.kd_weights, tuned.ce_weight, tuned.temperature,
                                tuned.loss_options), num_classes=10)
    loss = objective.losses["dkd"]
    assert (loss.beta, loss.temperature, loss.warmup, objective.ce_weight) == (3.123, 2.0, 4, 0.5)


def test_the_papers_point_is_the_defaults():
    c = Config(kd_loss=["kl_softmax"])
    assert paper_point(c, search_space(c)) == {"kl_softmax.weight": 0.9, "kl_softmax.temperature": 4.0, "lr": 0.05,
                                               "weight_decay": 5e-4, "label_smoothing": 0.0}
    assert settings_at(c, paper_point(c, search_space(c))).ce_weight == 0.1
    narrowed = Config(kd_loss=["kl_softmax"], tune_space=["kl_softmax.temperature=5:8"])
    assert "kl_softmax.temperature" not in paper_point(narrowed, search_space(narrowed))


def test_the_slice_is_held_out_of_train_disjoint_from_val_and_the_same_for_every_seed(tiny_data):
    layouts = [make_datamodule(Config(data_dir=str(tiny_data), seed=seed)).layout for seed in (0, 7)]
    splits = [tuning_split(layout, 0.34) for layout in layouts]
    files = [{name: {s.describe(i) for i in range(len(s))} for name, s in (("train", t.train), ("slice", t.val))}
             for t in splits]
    assert files[0] == files[1]  # stable across seeds
    val = {layouts[0].val.describe(i) for i in range(len(layouts[0].val))}
    train = {layouts[0].train.describe(i) for i in range(len(layouts[0].train))}
    assert files[0]["slice"] and not files[0]["slice"] & val and not files[0]["slice"] & files[0]["train"]
    assert files[0]["slice"] | files[0]["train"] == train
    held = splits[0].val.labels
    assert sorted(set(held)) == list(range(12)) and all(held.count(k) == 2 for k in set(held))  # 6 per class × 0.34


def test_a_class_too_small_to_split_is_refused(tiny_data):
    layout = make_datamodule(Config(data_dir=str(tiny_data))).layout
    layout.train.labels[:] = [0] + [1] * (len(layout.train.labels) - 1)
    with pytest.raises(KDError, match=r"^--tune_fraction: class \S+ has 1 image\(s\), too few to hold out one"):
        tuning_split(layout, 0.1)


def _study_of(paper: float | None, others: list[float]) -> optuna.Study:
    """An in-memory study: the papers' values enqueued first (pruned if ``paper`` is None), then other trials."""
    study = optuna.create_study(direction="maximize")
    x = optuna.distributions.FloatDistribution(0, 1)
    study.enqueue_trial({"x": 0.5})
    trial = study.ask({"x": x})
    study.tell(trial, paper, state=TrialState.PRUNED if paper is None else TrialState.COMPLETE)
    for value in others:
        study.tell(study.ask({"x": x}), value)
    return study


@pytest.mark.parametrize("paper, others, slice_size, chosen", [
    (82.0, [86.0, 40.0], 136, 0),    # 4 points on 136 images: within two standard errors (8.9), papers' values kept
    (72.0, [85.0, 40.0], 136, 1),    # 13 points: beyond them (9.9), the best trial
    (82.0, [86.0], 10000, 1),        # the same 4 points on 10,000 images are beyond them (1.0)
    (None, [50.0, 60.0], 136, 2),    # the papers' values were pruned
    (90.0, [80.0], 136, 0),          # the papers' values are the best
])
def test_the_papers_values_are_kept_unless_a_trial_beats_them_beyond_the_slices_noise(paper, others, slice_size,
                                                                                        chosen):
    trial, why = chosen_trial(_study_of(paper, others), slice_size)
    assert trial.number == chosen
    assert bool(why) == (chosen == 0 and max(others) > paper)
    if why:
        assert why.startswith("the flags' and papers' values: the best trial, 1, beat them by 4.00 points, within "
                              "two standard")


def _feed(score: SliceScore, curve: list[float]) -> bool:
    """Report ``curve`` epoch by epoch as a Lightning trainer would; whether the pruner stopped the fit."""
    for epoch, top1 in enumerate(curve):
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/top1": torch.tensor(top1)},
                                  current_epoch=epoch, should_stop=False)
        score.on_validation_end(trainer, None)
        if trainer.should_stop:
            return True
    return False


def test_the_pruner_judges_a_trial_by_its_best_slice_top1_so_far_not_its_latest_epoch():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for _ in range(2):
        trial = study.ask()
        assert not _feed(SliceScore(trial, None), [40.0, 45.0, 50.0])
        study.tell(trial, 50.0)
    trial = study.ask()
    swinging = SliceScore(trial, None)
    assert not _feed(swinging, [60.0, 15.0, 55.0])  # its second epoch's 15 is below the others' 45, its best not
    assert study.trials[-1].intermediate_values == {0: 60.0, 1: 60.0, 2: 60.0}
    assert swinging.top1 == [60.0, 15.0, 55.0]
    assert _feed(SliceScore(study.ask(), None), [30.0, 35.0])  # a trial that is never as good is still stopped


def test_trials_a_dead_process_left_running_are_failed(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan, mine = study.ask(), study.ask()
    orphan.set_user_attr("owner", f"{socket.gethostname()}:{dead.stdout.strip()}")
    mine.set_user_attr("owner", f"{socket.gethostname()}:{os.getpid()}")
    fail_orphans(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING]


def test_another_machines_trial_whose_heartbeat_stopped_is_failed(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    silent, beating = study.ask(), study.ask()
    for trial in (silent, beating):
        trial.set_user_attr("owner", "another-machine:1")
        storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
    storage.record_heartbeat(beating._trial_id)
    fail_orphans(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING]


@pytest.mark.parametrize("flags, message", [
    (["--tune", "0"], "--tune must be at least 2 (the first trial is the flags' own values), got 0"),
    (["--tune", "1"], "--tune must be at least 2 (the first trial is the flags' own values), got 1"),
    (["--tune", "2", "--tune_space", "kl_softmax.alpha=1:2"], "no setting kl_softmax.alpha"),
    (["--tune", "2", "--tune_space", "ce_weight=1:0.5"], "is empty"),
    (["--tune", "2", "--tune_space", "kl_softmax.weight=0.5:1.5"], "its range must stay below 1"),
    (["--tune", "2", "--tune_storage", "sqlite:////no/such/folder/study.db"], "cannot reach the study storage"),
    (["--tune", "2", "--tune_storage", "postgresql://kd:secret@127.0.0.1:9/kd"], "cannot reach the study storage"),
    (["--tune", "2", "--tune_storage", "nosuchdb://x"], "cannot reach the study storage"),
    (["--tune", "2", "--distill", "false", "--train_teacher", "true"], "add --baseline and/or --distill"),
    (["--tune", "2", "--assistant_arch", "cnn_tiny"], "assistant_arch"),
    (["--tune", "2", "--teacher_cache", "cache", "--teacher_cache_only"], "drop --teacher_cache_only"),
])
def test_bad_tune_input_is_one_line_before_anything_runs(tiny_data, tmp_path, capsys, flags, message):
    out = tmp_path / "runs"
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher", "--distill",
                 *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert "secret" not in err
    assert not out.exists() or not any(out.rglob("*.ckpt"))


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory) -> Path:
    """A 1-epoch teacher checkpoint on the tiny data."""
    out = tmp_path_factory.mktemp("teacher")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher"]) == 0
    return next(out.rglob("best.ckpt"))


def _study(url: str, stage: str = "distill") -> optuna.Study:
    """The study of ``stage`` in storage ``url`` (a baseline study's trials have no loss settings)."""
    studies = [optuna.load_study(study_name=name, storage=url) for name in optuna.get_all_study_names(url)]
    (study,) = [s for s in studies if any("." in key for t in s.trials for key in t.params) == (stage == "distill")]
    return study


def _finished(study: optuna.Study) -> list[int]:
    return sorted(t.number for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


@pytest.mark.slow
def test_a_tune_end_to_end_and_its_preset_repeats_the_final_run(tiny_data, tmp_path):
    run = run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", "runs", "--train_teacher", "--baseline",
                   "--distill", "--tune", "3", "--tune_epochs", "2", "--seeds", "0", "1"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no Optuna warnings or log lines on the console
    root = tmp_path / "runs" / "kd"
    url = f"sqlite:///{root / 'tune' / 'study.db'}"
    studies = {stage: _study(url, stage) for stage in ("baseline", "distill")}
    for study in studies.values():  # the same budget: trials, and epochs per unpruned trial
        assert _finished(study) == [0, 1, 2]
        assert {len(t.intermediate_values) for t in study.trials if t.state == TrialState.COMPLETE} == {2}
    assert set(studies["baseline"].trials[0].params) == {"lr", "weight_decay", "label_smoothing"}
    assert {"lr", "weight_decay", "label_smoothing", "kl_softmax.weight"} <= set(studies["distill"].trials[0].params)
    assert studies["baseline"].trials[0].params["lr"] == studies["distill"].trials[0].params["lr"] == 0.05
    for folder in (root / "tune", root / "tune" / "baseline"):
        report = folder / "report" / "version_0"
        assert {"tune.md", "tune.png", "best.yaml", "tune.json"} <= {p.name for p in report.iterdir()}
        assert len(list((folder / "trials").glob("trial_*"))) == 3  # each trial logs in its own folder
    hparams = yaml.safe_load((root / "tune" / "trials" / "trial_0001" / "hparams.yaml").read_text())
    assert {"kl_softmax.weight", "kl_softmax.temperature", "lr"} <= set(hparams)
    for stage, tuned in (("distill", ("kd_weights", "ce_weight", "loss_options", "teacher_checkpoint", "lr")),
                         ("baseline", ("lr", "weight_decay", "label_smoothing"))):
        folder = root / "tune" / ("" if stage == "distill" else "baseline") / "report" / "version_0"
        preset = yaml.safe_load((folder / "best.yaml").read_text())
        for version in ("version_0", "version_1"):  # every seed's stage trained and recorded the chosen settings
            saved = yaml.safe_load((root / stage / version / "config.yaml").read_text())
            assert all(preset[flag] == saved[flag] for flag in tuned), stage
        assert preset["tune"] is None and saved["tune"] == 3 and not preset["train_teacher"]
        assert preset["baseline"] == (stage == "baseline") and preset["distill"] == (stage == "distill")
    results = [json.loads((root / stage / v / "result.json").read_text()) for stage in ("baseline", "distill")
               for v in ("version_0", "version_1")]
    assert [r["tune_trials"] for r in results] == [3] * 4
    gains = [d["val_top1"][-1] - b["val_top1"][-1] for b, d in zip(results[:2], results[2:])]
    line = next(line for line in run.stdout.splitlines() if "gain over the baseline tuned, 3 trials" in line)
    assert line.startswith(f"distill (kl_softmax, tuned, 3 trials) gain over the baseline tuned, 3 trials: "
                           f"{sum(gains) / 2:+.2f} top-1 points, 95% CI [")
    assert f"wins on {sum(g > 0 for g in gains)} of 2 seeds" in line
    best = root / "tune" / "report" / "version_0" / "best.yaml"
    again = run_cli(["--flags_file", "none", "--config", str(best), "--experiment_name", "again", "--seed", "0"],
                    tmp_path)
    assert again.returncode == 0, again.stderr
    weights = [torch.load(root.parent / name / "distill" / "version_0" / "checkpoints" / "best.ckpt",
                          weights_only=False)["state_dict"] for name in ("kd", "again")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_a_tuned_baseline_resumed_with_other_tuned_settings_is_one_line_before_it_trains(tiny_data, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", "runs", "--baseline", "--tune", "2"]
    first = run_cli(flags, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "tune baseline: chose trial" in first.stdout and "tune distill" not in first.stdout  # the baseline alone
    again = run_cli([*flags, "--resume"], tmp_path)
    assert again.returncode == 0 and "baseline, seed 0: finished earlier" in again.stdout  # the same study: reused
    assert "tune trial" not in again.stdout
    folder = tmp_path / "runs" / "kd" / "baseline" / "version_0"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump(saved | {"lr": saved["lr"] * 2}))  # tuned by another study
    refused = run_cli([*flags, "--resume"], tmp_path)
    err = refused.stderr.strip()
    assert refused.returncode == 2
    assert err.startswith("error: --resume: runs/kd/baseline/version_0 finished tuned by --tune 2")
    assert f"lr {saved['lr'] * 2} → {saved['lr']}" in err and "\n" not in err
    assert sorted(p.name for p in folder.parent.iterdir()) == ["version_0"]  # nothing trained


def test_every_tuned_stage_gets_the_same_budget_sampler_and_pruner(tiny_data, tmp_path, monkeypatch):
    """The baseline's study and the distill stage's are opened alike: trials, epochs, sampler seed, pruner."""
    import kd.tune.search as search

    opened = []

    def recording(storage, name, seed, trials, epochs):
        study = real(storage, name, seed, trials, epochs)
        opened.append((seed, trials, epochs, type(study.sampler), type(study.pruner)))
        return study

    def scored_without_training(self, study, trial):
        for name, bounds in self.space.items():
            trial.suggest_float(name, bounds.low, bounds.high, log=bounds.log)
        study.tell(trial, 50.0)

    real = search.open_study
    monkeypatch.setattr(search, "open_study", recording)
    monkeypatch.setattr(search.Tuner, "_run_trial", scored_without_training)
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher",
                 "--baseline", "--distill", "--tune", "4", "--tune_epochs", "3", "--seeds", "5", "6"]) == 0
    assert len(opened) == 2 and opened[0] == opened[1] == (5, 4, 3, search.TrialSeededSampler,
                                                           optuna.pruners.MedianPruner)


@pytest.mark.slow
def test_a_tune_stopped_between_trials_and_resumed_finishes_n_trials_none_repeated(tiny_data, teacher, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", "runs", "--distill", "--teacher_checkpoint",
             str(teacher)]
    first = run_cli([*flags, "--tune", "2"], tmp_path)
    assert first.returncode == 0, first.stderr
    study_file = tmp_path / "runs" / "kd" / "tune" / "study.db"
    before = {t.number: t.params for t in _study(f"sqlite:///{study_file}").trials}
    resumed = run_cli([*flags, "--tune", "4", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    study = _study(f"sqlite:///{study_file}")
    assert _finished(study) == [0, 1, 2, 3] and len(study.trials) == 4
    assert {t.number: t.params for t in study.trials if t.number in before} == before
    assert resumed.stdout.count("tune trial ") == 2


@pytest.mark.slow
def test_two_processes_share_one_study(tiny_data, teacher, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [subprocess.Popen([sys.executable, str(PROJECT / "experiment.py"), *FAST, "--data_dir",
                                   str(tiny_data), "--output_dir", "runs", "--experiment_name", name, "--distill",
                                   "--teacher_checkpoint", str(teacher), "--tune", "5", "--tune_storage", url],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("a", "b")]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    study = _study(url)
    assert _finished(study) == sorted(set(_finished(study))) and len(_finished(study)) == 5
    ran = [{int(d.name.removeprefix("trial_")) for d in (tmp_path / "runs" / name / "tune" / "trials").glob("trial_*")}
           for name in ("a", "b")]
    assert not ran[0] & ran[1] and set(_finished(study)) <= ran[0] | ran[1]


def test_a_process_that_loses_the_race_to_create_a_new_study_database_opens_it_again(tmp_path, monkeypatch):
    from sqlalchemy.exc import IntegrityError

    import kd.tune.storage as tune_storage
    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # what the second of two processes creating one file saw in CI
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_storage.optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(tune_storage.time, "sleep", lambda s: None)
    assert tune_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}") is not None and len(calls) == 2
