"""A run's plan (kd.run.plan): its stages as values, built from the flags alone, in the order the runner trains them."""

from __future__ import annotations

from dataclasses import replace


import pytest

from kd.config import Config, Role
from kd.errors import KDError
from kd.run.plan import Stage, TeacherFrom, check_stages, plan_stages, stage_record
from kd.train.teachers import Teacher


def _names(stages: list[Stage]) -> list[tuple[str, int]]:
    return [stage.key for stage in stages]


def test_a_teacher_is_trained_once_and_teaches_every_seeds_student():
    stages = plan_stages(Config(train_teacher=True, baseline=True, distill=True, seeds=[3, 4], tune=8))
    assert _names(stages) == [("teacher", 3), ("baseline", 3), ("distill", 3), ("baseline", 4), ("distill", 4)]
    distills = [stage for stage in stages if stage.name == "distill"]
    assert {stage.teacher for stage in distills} == {TeacherFrom("teacher", 3)}
    assert [stage.tune for stage in distills] == [True, False]  # tuned once, with the first seed
    assert all(stage.baseline == "baseline" and stage.role is Role.DISTILL for stage in distills)
    assert [stage.teaches for stage in stages] == [True, False, False, False, False]


def test_repeat_teacher_trains_one_per_seed():
    stages = plan_stages(Config(train_teacher=True, distill=True, seeds=[0, 1], repeat_teacher=True))
    assert [stage.teacher for stage in stages if stage.name == "distill"] == [TeacherFrom("teacher", 0),
                                                                           TeacherFrom("teacher", 1)]


def test_assistants_form_a_chain_from_the_given_checkpoints(tmp_path):
    files = [str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]  # the plan names them; nothing is loaded yet
    stages = plan_stages(Config(distill=True, teacher_checkpoint=files, teacher_arch=["resnet50"],
                                assistant_arch=["resnet34", "resnet18"], student_arch="cnn_tiny"))
    assert _names(stages) == [("assistant1", 0), ("assistant2", 0), ("distill", 0)]
    assert [stage.teacher for stage in stages] == [TeacherFrom(), TeacherFrom("assistant1", 0),
                                                   TeacherFrom("assistant2", 0)]  # the files, then the chain
    assert [stage.arch for stage in stages] == ["resnet34", "resnet18", "cnn_tiny"]
    assert [stage.teaches for stage in stages] == [True, True, False]


def test_a_stage_records_its_own_flags_and_the_very_teacher_it_learns_from(tmp_path):
    c = Config(train_teacher=True, baseline=True, distill=True, seeds=[0, 1], student_weights="w.pt")
    distill = next(stage for stage in plan_stages(c) if stage.name == "distill")
    teacher = Teacher(("cnn_small",), (tmp_path / "best.ckpt",), None)
    record = stage_record(c, distill, teacher)
    assert (record.train_teacher, record.baseline, record.distill, record.seeds) == (False, False, True, [])
    assert record.teacher_checkpoint == [str(tmp_path / "best.ckpt")] and record.teacher_arch == ["cnn_small"]
    assert (record.kd_weights, record.ce_weight, record.temperature) == ([0.9], 0.1, 4.0)  # in force, recorded
    assert record.student_weights == "w.pt"
    baseline = next(stage for stage in plan_stages(c) if stage.name == "baseline")
    assert stage_record(c, baseline, None).teacher_checkpoint == [] and stage_record(c, baseline, None).baseline


@pytest.mark.parametrize("flags, message", [
    ({}, "nothing to run"),
    ({"distill": True}, "--distill needs a teacher"),
    ({"baseline": True, "seeds": [1, 1]}, "--seeds: 1 given more than once"),
    ({"baseline": True, "assistant_arch": ["resnet18"]}, "--assistant_arch trains teacher assistants"),
])
def test_a_plan_that_cannot_work_is_refused_before_anything_loads(flags, message):
    with pytest.raises(KDError, match=message):
        plan_stages(Config(**flags))


def test_teacher_lr_sets_the_teacher_stages_learning_rate_and_leaves_the_students_at_lr():
    c = Config(train_teacher=True, baseline=True, distill=True, lr=0.01, teacher_lr=0.05)
    records = {s.name: stage_record(c, s, None) for s in plan_stages(c)}
    assert (records["teacher"].lr, records["baseline"].lr, records["distill"].lr) == (0.05, 0.01, 0.01)
    alone = Config(train_teacher=True, lr=0.01)
    assert stage_record(alone, plan_stages(alone)[0], None).lr == 0.01
    # The rate in force is what --resume compares: a teacher trained at --lr 0.05 is one trained at --teacher_lr 0.05.
    plain = Config(train_teacher=True, lr=0.05)
    assert (records["teacher"].identity(Role.TEACHER) == stage_record(plain, plan_stages(plain)[0], None)
            .identity(Role.TEACHER))


@pytest.mark.parametrize("config, message", [
    (Config(distill=True, train_teacher=True, mutual_weight=3.0), "--mutual_weight 3.0: it weighs the peers"),
    (Config(distill=True, teacher_checkpoint=["t.ckpt"], teacher_lr=0.1), "--teacher_lr 0.1: it is the learning rate"),
    (Config(distill=True, mutual=["cnn_tiny"], kd_loss=["crd"]), "--mutual cnn_tiny with --kd_loss crd"),
])
def test_flags_that_would_be_ignored_are_refused(config, message):
    with pytest.raises(KDError, match=message):
        plan_stages(config)


def test_each_assistant_trains_at_its_own_learning_rate_and_the_student_at_the_runs():
    c = Config(train_teacher=True, distill=True, assistant_arch=["cnn_small", "cnn_tiny"], assistant_lr=[0.1, 0.02],
               teacher_lr=0.3, lr=0.05)
    records = {stage.name: stage_record(c, stage, None) for stage in plan_stages(c)}
    assert {name: record.lr for name, record in records.items()} == {
        "teacher": 0.3, "assistant1": 0.1, "assistant2": 0.02, "distill": 0.05}
    assert all(record.assistant_lr == [] and record.teacher_lr is None for record in records.values())
    with pytest.raises(KDError, match=r"--assistant_lr 0.1: give one learning rate per --assistant_arch \(2: "):
        check_stages(replace(c, assistant_lr=[0.1]))
