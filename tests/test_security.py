"""No file kd reads makes it import a module or run a file: user code runs only when the user names it.

Each reader gets a file that names code outside kd (a ``file.py:Name`` and a ``module:Name``, both of which
leave a mark when imported) and must refuse it, or ignore it, without leaving the mark.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST
from kd.cli import main
from kd.data.sources.demo import DEMO_HUES, DEMO_SHAPES
from kd.flags import resolve
from kd.models.build import build_model, load_network

CLASSES = sorted(f"{hue}_{shape}" for hue in DEMO_HUES for shape in DEMO_SHAPES)  # as in the tiny_data fixture
SIZE = ["--image_size", "16", "--num_workers", "0", "--accelerator", "cpu", "--flags_file", "none"]


@pytest.fixture
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A user file and a user module, each building cnn_tiny and writing a mark the moment it is imported."""
    mark = tmp_path / "imported"
    code = (f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
            "from kd.models.kd_cnns import cnn_tiny as Net\n")
    (tmp_path / "evil.py").write_text(code)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "kd_evil_module.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    return {"mark": mark, "file": f"{tmp_path / 'evil.py'}:Net", "module": "kd_evil_module:Net"}


def _checkpoint(path: Path, arch: str, layout: str = "kd") -> Path:
    """cnn_tiny's weights saved as kd saves them, recording ``arch`` as the network (or as a released teacher)."""
    torch.manual_seed(0)
    state = build_model("cnn_tiny", len(CLASSES)).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "kd":
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                    "hyper_parameters": {"arch": arch, "class_names": CLASSES, "image_size": 16,
                                         "augment": "imagenet"}}, path)
    else:  # RepDistiller's and mdistiller's released teachers, with a hostile extra entry
        torch.save({"model": state, "epoch": 240, "best_acc": 70.0, "arch": arch}, path)
    return path


@pytest.mark.parametrize("kind", ["file", "module"])
def test_evaluate_refuses_a_checkpoint_naming_code_the_user_did_not_name(tiny_data, tmp_path, evil, kind, capsys):
    path = _checkpoint(tmp_path / "best.ckpt", evil[kind])
    assert main(["--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), *SIZE,
                 "--evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --evaluate: {path} names the architecture {evil[kind]}, which is code outside "
                           f"kd; kd runs such code only when you name it yourself: give --student_arch {evil[kind]} "
                           "if you trust it")
    assert not evil["mark"].exists()


@pytest.mark.parametrize("flag", ["--evaluate", "--export"])
def test_code_the_user_names_is_trusted(tiny_data, tmp_path, evil, flag, capsys):
    path = _checkpoint(tmp_path / "best.ckpt", evil["file"])
    export = ["--export", "torchscript"] if flag == "--export" else []
    assert main(["--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), *SIZE, "--evaluate",
                 str(path), "--student_arch", evil["file"], *export]) == 0
    assert "top-1" in capsys.readouterr().out and evil["mark"].read_text() == "ran"
    assert not export or path.with_suffix(".torchscript.pt").is_file()


@pytest.mark.parametrize("layout", ["kd", "released"])
@pytest.mark.parametrize("count", [1, 2])
def test_teacher_checkpoints_naming_user_code_are_refused_without_importing_it(tiny_data, tmp_path, evil, layout,
                                                                               count, capsys):
    paths = [str(_checkpoint(tmp_path / f"t{i}.ckpt", evil["file"], layout)) for i in range(count)]
    code = main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--distill",
                 "--teacher_arch", *["cnn_tiny"] * count, "--teacher_checkpoint", *paths])
    err = capsys.readouterr().err
    assert not evil["mark"].exists()
    if layout == "kd":  # it records the network it holds: not the one asked for
        assert code == 2 and "Traceback" not in err
        assert f"--teacher_checkpoint: {paths[0]} holds a {evil['file']}, not the cnn_tiny asked for" in err
    else:  # a released teacher records no network: its extra entry is never read
        assert code == 0, err


@pytest.mark.parametrize("flag", ["--student_weights", "--teacher_weights"])
def test_a_weights_file_naming_user_code_is_read_for_its_weights_only(tiny_data, tmp_path, evil, flag, capsys):
    path = _checkpoint(tmp_path / "w.ckpt", evil["module"])
    stage = "--baseline" if flag == "--student_weights" else "--train_teacher"
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), stage,
                 flag, str(path)]) == 0, capsys.readouterr().err
    assert not evil["mark"].exists()


@pytest.fixture
def finished(tiny_data, tmp_path) -> Path:
    """A finished baseline stage, on disk as kd left it."""
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--baseline"]) == 0
    return tmp_path / "out" / "kd" / "baseline" / "version_0"


def _tamper(run: Path, arch: str) -> None:
    """Make the stage's records name user code: result.json's network, config.yaml's networks and loss."""
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps(result | {"arch": arch}))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(saved | {"student_arch": arch, "teacher_arch": [arch],
                                                             "kd_loss": [arch]}))


def test_resume_and_report_over_records_naming_user_code_import_nothing(tiny_data, tmp_path, finished, evil, capsys):
    _tamper(finished, evil["module"])
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out")]
    assert main([*flags, "--report", str(tmp_path / "out" / "kd")]) == 0
    assert main([*flags, "--baseline", "--resume"]) == 0
    assert not evil["mark"].exists()


def test_export_of_a_reused_stage_whose_result_names_user_code_is_refused(tiny_data, tmp_path, finished, evil,
                                                                        capsys):
    result = json.loads((finished / "result.json").read_text())
    (finished / "result.json").write_text(json.dumps(result | {"arch": evil["file"]}))
    capsys.readouterr()
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--baseline",
                 "--resume", "--export", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: --export: {finished / 'result.json'} names the architecture {evil['file']}, which is code "
                   f"outside kd; kd runs such code only when you name it yourself: give --student_arch "
                   f"{evil['file']} if you trust it")
    assert not evil["mark"].exists()


def test_loading_a_network_compares_recorded_user_code_by_spelling_alone(tmp_path, evil):
    path = _checkpoint(tmp_path / "t.ckpt", evil["module"])
    with pytest.raises(Exception, match="holds a kd_evil_module:Net, not the kd:cnn_tiny asked for"):
        load_network(path, "kd:cnn_tiny", CLASSES, 16)
    assert not evil["mark"].exists()


def test_reproduce_reads_records_naming_user_code_without_importing(tiny_data, tmp_path, finished, evil):
    from test_reproduce import reproduce

    config = resolve([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "out"), "--baseline",
                      "--distill"]).config
    result = json.loads((finished / "result.json").read_text())
    (finished / "result.json").write_text(json.dumps(result | {"arch": evil["file"]}))
    assert [r.arch for r in reproduce.row_results(config)["baseline"]] == [evil["file"]]
    _tamper(finished, evil["module"])
    assert reproduce.row_results(config)["baseline"] == []  # its flags are not this run's any more
    assert not evil["mark"].exists()
