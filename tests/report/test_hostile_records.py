"""Records that lie: result.json, config.yaml and cache files of the wrong type or shape are one-line errors naming
the file and the field; two reports written at once each get their folder; an offline download leaves no ROOT."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from conftest import FAST
from kd.cli import main
from kd.config import Config
from kd.data.image_cache import ImageCache
from kd.data.sources import LoadOptions, open_source
from kd.errors import KDError
from kd.report.results import FIELD_KINDS, StageResult
from kd.train.teacher_cache import TeacherCache
from kd.versions import claimed_version, next_version


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """An output folder with a finished teacher and baseline, trained once for the tests below."""
    out = tmp_path_factory.mktemp("finished")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(out), "--train_teacher", "--baseline"]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run to break."""
    shutil.copytree(finished_run, tmp_path / "out")
    return tmp_path / "out"


def _error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _stage(out: Path, stage: str = "baseline") -> Path:
    return out / "kd" / stage / "version_0"


def test_every_result_field_is_checked():
    assert set(FIELD_KINDS) == {f for f in StageResult.__dataclass_fields__}


@pytest.mark.parametrize("change, message", [
    ({"best_top1": "81.5"}, "field 'best_top1' is str \"81.5\", not a number"),  # before: a traceback
    ({"seed": True}, "field 'seed' is bool true, not a whole number"),
    ({"val_top1": [50.0, "x"]}, "field 'val_top1' is list [50.0, \"x\"], not a list of numbers"),
    ({"teachers": [{"arch": 1}]}, "field 'teachers'"),
    ({"teacher_top1": "high"}, "field 'teacher_top1' is str \"high\", not a number or null"),
    ({"warnings": [1]}, "field 'warnings' is list [1], not a list of strings"),
    ({"shape": 3}, "an unknown field 'shape'"),
])
def test_a_result_field_of_the_wrong_type_is_named(run_copy, change, message):
    path = _stage(run_copy) / "result.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(KDError, match=f"^{path} is not a kd result file \\({__import__('re').escape(message)}"):
        StageResult.load(path)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "a JSON list, not an object of fields"),
    ("[" * 100_000, "RecursionError"),
    ('{"stage": "baseline"}', "no field 'experiment'"),
])
def test_a_result_file_that_is_not_an_object_of_fields_is_named(run_copy, text, message):
    path = _stage(run_copy) / "result.json"
    path.write_text(text)
    with pytest.raises(KDError, match=f"^{path} is not a kd result file \\({message}"):
        StageResult.load(path)


def test_a_result_of_the_wrong_type_is_one_line_on_resume_and_report(run_copy, tiny_data, capsys):
    path = _stage(run_copy) / "result.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"best_top1": "81.5"}))
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(run_copy), "--train_teacher", "--baseline"]
    assert main([*flags, "--resume"]) == 2
    assert f"{path} is not a kd result file (field 'best_top1'" in _error(capsys)
    assert main(["--flags_file", "none", "--report", str(run_copy / "kd"), "--output_dir", str(run_copy)]) == 2
    assert f"--report: {path} is not a kd result file (field 'best_top1'" in _error(capsys)


@pytest.mark.parametrize("line, message", [
    ("seed: abc", "seed is str 'abc', not int"),
    ("seed: [1]", "seed is list [1], not int"),
    ("lr: true", "lr is bool True, not float"),
    ("epochs: 1.5", "epochs is float 1.5, not int"),
    ("kd_weights: [0.5, x]", "kd_weights is list [0.5, 'x'], not a list of float"),
])
def test_a_config_field_of_the_wrong_type_is_named_on_resume_and_not_recorded_in_a_report(
        run_copy, tiny_data, capsys, line, message):
    path = _stage(run_copy) / "config.yaml"
    path.write_text(path.read_text() + line + "\n")  # YAML keeps the last of a key written twice
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(run_copy), "--train_teacher", "--baseline"]
    assert main([*flags, "--resume"]) == 2  # before: the stage was silently trained again, or a traceback
    assert _error(capsys) == (f"error: --resume: {path} is not a kd configuration ({message}); restore it, or move "
                              f"{path.parent} out of the experiment")
    assert main(["--flags_file", "none", "--report", str(run_copy / "kd"), "--output_dir", str(run_copy)]) == 0
    assert f"warning: {path}: {message}; the report shows it as not recorded" in capsys.readouterr().err
    assert (run_copy / "kd" / "report" / "version_0" / "report.md").is_file()


def test_a_report_of_an_ensemble_weight_of_the_wrong_type_does_not_crash(run_copy, capsys):
    path = _stage(run_copy) / "config.yaml"
    path.write_text(path.read_text() + "teacher_checkpoint: [a.ckpt, b.ckpt]\nensemble_weights: [x, y]\n")
    result = _stage(run_copy) / "result.json"
    result.write_text(json.dumps(json.loads(result.read_text()) | {"kd_loss": "kl_softmax"}))
    assert main(["--flags_file", "none", "--report", str(run_copy / "kd"), "--output_dir", str(run_copy)]) == 0
    assert "ensemble_weights is list ['x', 'y'], not a list of float" in capsys.readouterr().err  # before: ValueError


def test_two_reports_written_at_once_each_get_their_own_folder(run_copy, capsys, monkeypatch):
    import kd.run.summary as summary

    real = summary.write_report

    def another_run_finishes_first(results: list, folder: Path) -> Path:
        theirs = next_version(folder.parent)  # the other run picked the first free number, as runs do
        theirs.mkdir()
        (theirs / "report.md").write_text("theirs")
        return real(results, folder)

    monkeypatch.setattr(summary, "write_report", another_run_finishes_first)
    reports = run_copy / "kd" / "report"
    assert [p.name for p in reports.iterdir()] == ["version_0"]  # the finished run's own
    assert main(["--flags_file", "none", "--report", str(run_copy / "kd"), "--output_dir", str(run_copy)]) == 0
    assert sorted(p.name for p in reports.iterdir()) == ["version_0", "version_1", "version_2"]  # before: exit 2
    assert f"report: {reports / 'version_1' / 'report.md'}" in capsys.readouterr().out
    assert (reports / "version_2" / "report.md").read_text() == "theirs"


def test_two_tune_reports_written_at_once_each_get_their_own_folder(tiny_data, tmp_path, monkeypatch):
    import kd.tune.search as search

    real = search.write_tune_report

    def another_tune_finishes_first(*args: object) -> Path:
        folder = args[5]
        theirs = next_version(folder.parent)
        theirs.mkdir()
        (theirs / "tune.md").write_text("theirs")
        return real(*args)

    monkeypatch.setattr(search, "write_tune_report", another_tune_finishes_first)
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--tune", "2"]) == 0  # before: FileExistsError
    reports = sorted((tmp_path / "kd" / "tune" / "report").iterdir())
    assert [p.name for p in reports] == ["version_0", "version_1"]
    assert (reports[0] / "best.yaml").is_file() and (reports[1] / "tune.md").read_text() == "theirs"


def test_a_claimed_version_that_fails_leaves_nothing(tmp_path):
    with pytest.raises(OSError), claimed_version(tmp_path / "exp" / "report") as folder:
        (folder / "part.md").write_text("half")
        raise OSError("No space left on device")
    assert not (tmp_path / "exp").exists()


def test_an_offline_download_removes_the_root_it_made_and_only_that(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(socket, "setdefaulttimeout", lambda s: None)
    for root, kept in ((tmp_path / "new" / "data", tmp_path), (tmp_path / "there", tmp_path / "there")):
        kept.mkdir(exist_ok=True)
        spec = f"torchvision:CIFAR10:{root}"
        with pytest.raises(KDError, match="could not download CIFAR10"):
            open_source(spec).load(LoadOptions.from_config(Config(data_dir=spec, download_data=True)))
        assert kept.is_dir() and not (tmp_path / "new").exists()  # before: new/data was left, empty
    assert list((tmp_path / "there").iterdir()) == []


@pytest.mark.parametrize("change", [{"count": -1}, {"count": "72"}, {"nbytes": 1.5}, {"short_side": "16"},
                                    {"version": True}])
def test_an_image_cache_whose_meta_lies_is_not_opened(tiny_data, tmp_path, change):
    from kd.data.sources.folder import ImageFolderSource

    layout = ImageFolderSource(str(tiny_data)).load(LoadOptions.from_config(Config(data_dir=str(tiny_data))))
    cache = ImageCache.build(layout.val, 8, tmp_path)
    meta = json.loads((cache.folder / "meta.json").read_text())
    (cache.folder / "meta.json").write_text(json.dumps(meta | change))
    with pytest.raises(KDError, match="is not a complete image cache"):  # before: opened with a text short side
        ImageCache(cache.folder)
    rebuilt = ImageCache.build(layout.val, 8, tmp_path)  # a damaged cache is built again, saying so
    assert len(rebuilt) == len(layout.val) and rebuilt.short_side == 8


@pytest.mark.parametrize("array, value, message", [
    ("values", np.full((4, 2), "x"), "values.npy holds <U1, not floats"),  # before: ValueError in a training step
    ("indices", np.full((4, 2), 7, dtype=np.int32), "indices.npy names classes outside 0 to 2"),
    ("filled", np.ones(4, dtype=np.float32), "filled.npy holds float32, not booleans"),
])
def test_a_teacher_cache_array_of_the_wrong_type_is_named(tmp_path, array, value, message):
    cache = TeacherCache(tmp_path, "key", {"train": 4, "val": 4}, num_classes=3, topk=2)
    cache.record(0, torch.arange(4), torch.randn(4, 3))
    cache.commit(0)
    np.save(cache.folder / "epoch_0000" / f"{array}.npy", value)
    with pytest.raises(KDError, match=f"epoch_0000 is damaged \\({message}\\); remove it"):
        TeacherCache(tmp_path, "key", {"train": 4, "val": 4}, num_classes=3, topk=2).lookup(0, torch.arange(4))


def test_a_study_file_that_is_not_a_database_is_one_line(tiny_data, tmp_path, capsys):
    (tmp_path / "kd" / "tune").mkdir(parents=True)
    (tmp_path / "kd" / "tune" / "study.db").write_text("not a database")
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
                 "--tune", "2"]) == 2
    assert "cannot open the study" in _error(capsys)
    assert (tmp_path / "kd" / "tune" / "study.db").read_text() == "not a database"
