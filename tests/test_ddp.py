"""Two processes on the CPU (DDP over gloo): one set of outputs, metrics over the whole validation set."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import FAST, PROJECT, run_cli
from kd.config import Config
from kd.data.loaders import make_datamodule
from kd.data.transforms import normalize
from kd.models.build import load_network

pytestmark = pytest.mark.slow  # two processes train together


def test_ddp_run_writes_once_and_syncs_validation_metrics(tiny_data, tmp_path):
    data_dir = shutil.copytree(tiny_data, tmp_path / "data")
    (data_dir / "val" / "red_ring" / "0000.png").unlink()  # 35 images: two ranks cannot split them evenly
    result = run_cli([*FAST, "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--devices", "2",
                      "--strategy", "ddp", "--batch_size", "6", "--train_teacher", "--baseline", "--distill",
                      "--teacher_arch", "cnn_small"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("distill (kl_softmax) gain over the baseline") == 1  # one summary, from rank 0
    root = tmp_path / "kd"
    assert sorted(p.name for p in root.iterdir()) == ["baseline", "distill", "report", "teacher"]
    for stage in ("teacher", "baseline", "distill", "report"):
        assert [p.name for p in (root / stage).iterdir()] == ["version_0"]  # not one per rank
    assert len(list(root.rglob("config.yaml"))) == 3 and len(list(root.rglob("result.json"))) == 3
    writers = {p.name.split(".")[-2] for p in root.rglob("events.out.tfevents.*")}  # ...tfevents.TIME.HOST.PID.N
    assert len(writers) == 1  # TensorBoard files come from one process

    # The reported top-1 must be the whole validation set's (35 images, none counted twice), not rank 0's share.
    data = make_datamodule(Config(data_dir=str(data_dir), image_size=16, batch_size=35, num_workers=0))
    for stage, arch in (("teacher", "cnn_small"), ("distill", "cnn_tiny")):
        reported = json.loads((root / stage / "version_0" / "result.json").read_text())["best_top1"]
        model = load_network(root / stage / "version_0" / "checkpoints" / "best.ckpt", arch, data.classes, 16).eval()
        x, y, _ = next(iter(data.val_dataloader()))
        with torch.no_grad():
            accuracy = 100 * (model(normalize(x)).argmax(1) == y).float().mean().item()
        assert abs(reported - accuracy) < 1e-4, (stage, reported, accuracy)


@pytest.mark.parametrize("flags, students", [
    (["--mutual", "cnn_tiny"], {"distill", "peer1"}),
    (["--train_teacher", "--kd_loss", "mlkd"], {"distill"}),
])
def test_mutual_learning_and_two_view_losses_train_under_ddp(tiny_data, tmp_path, flags, students):
    result = run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--devices", "2",
                      "--strategy", "ddp", "--batch_size", "6", "--distill", *flags], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in (tmp_path / "kd").rglob("result.json")]
    assert {r["stage"] for r in results} - {"teacher"} == students  # one row each, written by rank 0 alone
    assert len(results) == len(students) + ("--train_teacher" in flags)


def test_an_init_phase_trains_under_ddp_that_finds_unused_parameters_and_plain_ddp_is_refused(tiny_data, tmp_path):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--devices", "2", "--batch_size",
             "6", "--train_teacher", "--distill", "--kd_loss", "ft", "--student_layers", "features.3",
             "--teacher_layers", "features.3", "--loss_options", "ft.init_epochs=1"]
    refused = run_cli([*flags, "--strategy", "ddp"], cwd=tmp_path)
    assert refused.returncode == 2 and "pass --strategy ddp_find_unused_parameters_true" in refused.stderr
    result = run_cli([*flags, "--strategy", "ddp_find_unused_parameters_true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = sorted(json.loads(path.read_text())["stage"] for path in (tmp_path / "kd").rglob("result.json"))
    assert stages == ["distill", "init_distill", "teacher"]


def test_the_teacher_cache_fills_under_ddp_exactly_and_is_read_by_any_number_of_processes(tiny_data, tmp_path):
    assert run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "t"), "--train_teacher",
                    "--teacher_arch", "cnn_small"], cwd=tmp_path).returncode == 0
    teacher = tmp_path / "t" / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    cache = tmp_path / "cache"

    def distill(out: str, *flags: str) -> list[float]:
        result = run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / out), "--distill",
                          "--teacher_arch", "cnn_small", "--teacher_checkpoint", str(teacher), "--epochs", "2",
                          "--batch_size", "6", *flags], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / out / "kd" / "distill" / "version_0" / "result.json").read_text())["val_top1"]

    two = ["--devices", "2", "--strategy", "ddp"]
    cached = ["--teacher_cache", str(cache), "--teacher_cache_dtype", "float32"]
    online = distill("online", *two)
    assert distill("fill", *two, *cached) == online  # trained on the very logits it stored
    folders = list(cache.iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["epoch_0000", "epoch_0001", "val"]
    assert distill("read", *two, *cached) == online  # read back: the same top-1, epoch by epoch ...
    weights = [torch.load(tmp_path / out / "kd" / "distill" / "version_0" / "checkpoints" / "last.ckpt",
                          weights_only=True)["state_dict"] for out in ("online", "read")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # ... and the same weights, bit for bit
    distill("one", *cached, "--teacher_cache_only")  # every split is there for a single process too


def test_two_nodes_simulated_on_this_machine_train_as_two_processes_on_one(tiny_data, tmp_path):
    """``--num_nodes 2``, one process per "node" (node ranks 0 and 1, as torchrun or SLURM would start them), with
    the teacher cache: one set of outputs, and the very top-1 of two processes on one node."""
    assert run_cli([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "t"), "--train_teacher",
                    "--teacher_arch", "cnn_small"], cwd=tmp_path).returncode == 0
    teacher = tmp_path / "t" / "kd" / "teacher" / "version_0" / "checkpoints" / "best.ckpt"
    flags = [*FAST, "--data_dir", str(tiny_data), "--distill", "--teacher_arch", "cnn_small", "--teacher_checkpoint",
             str(teacher), "--epochs", "2", "--batch_size", "6", "--strategy", "ddp"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, str(PROJECT / "experiment.py"), *flags, "--devices", "1", "--num_nodes",
                               "2", "--output_dir", str(tmp_path / "nodes"), "--teacher_cache", str(tmp_path / "c")],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "NODE_RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
             for rank in (0, 1)]
    outcomes = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outcomes[0][1][-2000:] + outcomes[1][1][-2000:]
    results = list((tmp_path / "nodes").rglob("result.json"))
    assert [p.parent.name for p in results] == ["version_0"] and len(list((tmp_path / "c").iterdir())) == 1
    one_node = run_cli([*flags, "--devices", "2", "--output_dir", str(tmp_path / "one")], cwd=tmp_path)
    assert one_node.returncode == 0, one_node.stderr[-2000:]
    reference = json.loads((tmp_path / "one" / "kd" / "distill" / "version_0" / "result.json").read_text())
    assert json.loads(results[0].read_text())["val_top1"] == reference["val_top1"]
