"""Files an earlier kd wrote (tests/fixtures/release_2026_12: checkpoints, result.json, config.yaml, a teacher
cache, an image cache, a study.db) still evaluate, export, report and resume (reused, not retrained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from kd.cli import main
from kd.data.image_cache import ImageCache
from kd.data.images import load_rgb, resize_short
from kd.train.teacher_cache import TeacherCache

RELEASE = Path(__file__).parent / "fixtures" / "release_2026_12"
COMMON = ["--flags_file", "none", "--image_size", "16", "--num_workers", "0", "--accelerator", "cpu",
          "--data_dir", "data", "--output_dir", "runs"]
# The flags that wrote the release (its README): the same flags find its stages again.
RUN = [*COMMON, "--batch_size", "16", "--epochs", "2", "--teacher_arch", "cnn_tiny", "--student_arch", "cnn_tiny",
       "--train_teacher", "--baseline", "--distill", "--teacher_cache", "cache", "--image_cache", "images"]
TUNE = ["--tune", "2", "--tune_epochs", "1", "--tune_fraction", "0.25"]


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the release's files, moved elsewhere (as a user's experiment folder may be), as the working folder."""
    shutil.copytree(RELEASE, tmp_path / "release")
    monkeypatch.chdir(tmp_path / "release")
    return tmp_path / "release"


def _stage_versions(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for stage in ("teacher", "baseline", "distill")
                  for p in (root / "runs" / "kd" / stage).glob("version_*"))


def _best_top1(root: Path, stage: str) -> float:
    return json.loads((root / "runs" / "kd" / stage / "version_0" / "result.json").read_text())["best_top1"]


def test_a_released_checkpoint_evaluates_and_exports(release, capsys):
    best = "runs/kd/distill/version_0/checkpoints/best.ckpt"
    assert main([*COMMON, "--evaluate", best, "--export", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {_best_top1(release, 'distill'):.2f} %" in out
    assert (release / best).with_suffix(".torchscript.pt").is_file()


def test_released_results_report(release, capsys):
    assert main([*COMMON, "--report", "runs/kd"]) == 0
    out = capsys.readouterr().out
    for stage in ("teacher", "baseline", "distill (kl_softmax)"):
        assert stage in out
    assert f"{_best_top1(release, 'teacher'):.2f}" in out


@pytest.mark.slow
def test_a_released_run_resumes_by_reusing_every_stage(release, capsys):
    """The release tuned the distill stage alone, over its loss settings; its tune chose the papers' values, which
    the distill stage recorded as flags (``--loss_options kl_softmax.temperature=4``). Since then --tune searches the
    training settings of every student stage too (a new study: a resumed --tune runs its trials), so the run resumes
    with the flags the tune chose, as its best.yaml holds them, and its study stays readable."""
    before = _stage_versions(release)
    assert main([*RUN, "--loss_options", "kl_softmax.temperature=4", "--resume"]) == 0
    out = capsys.readouterr().out
    for stage in ("teacher", "baseline", "distill"):
        assert f"== {stage}, seed 0: finished earlier in runs/kd/{stage}/version_0" in out
    assert "tune" not in out
    assert _stage_versions(release) == before
    url = f"sqlite:///{release / 'runs' / 'kd' / 'tune' / 'study.db'}"
    (name,) = optuna.get_all_study_names(url)
    assert len(optuna.load_study(study_name=name, storage=url).trials) == int(TUNE[1])  # its 2 trials


def test_the_released_image_cache_holds_the_images_it_was_built_from(release):
    val = sorted((release / "data" / "val").glob("*/*.png"))
    cache = ImageCache(release / "images" / "13ecf99f4c9a93813a55796d6d72012a2b954153ce82670c8d795061cf3b2e61")
    assert len(cache) == len(val) == 36
    for i, path in enumerate(val):
        assert torch.equal(cache[i], torch.from_numpy(resize_short(load_rgb(path), 18).copy()).permute(2, 0, 1))


def test_the_released_teacher_cache_holds_the_teachers_validation_logits(release):
    """Its validation logits score the teacher's recorded top-1 (3 images a class, in class order)."""
    cache = TeacherCache(release / "cache", "89770a4b151aa693e5aab490", {"train": 72, "val": 36}, 12)
    assert cache.missing(epochs=2) == []
    logits = cache.lookup(None, torch.arange(36))
    labels = torch.arange(12).repeat_interleave(3)
    top1 = 100 * (logits.argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(_best_top1(release, "teacher"), abs=0.01)
