"""--mutual ARCH ...: deep mutual learning, the student and its peers trained together, each with its own row."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import FAST, SLOW_NET, start_cli, wait_mid_epoch
from kd.cli import main
from kd.config import Config
from kd.report.results import find_results
from kd.run.plan import plan_stages
from kd.train.mutual import MutualDistiller, mutual_term


def _kl(target: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(own)) averaged over the batch, from its definition (Zhang et al. 2018, eq. 2)."""
    p, q = target.softmax(1), own.softmax(1)
    return (p * (p.log() - q.log())).sum(1).mean()


def test_the_mutual_term_is_the_mean_kl_from_each_other_network_and_moves_only_its_own():
    torch.manual_seed(0)
    logits = [torch.randn(5, 7, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    value = mutual_term(logits, 1)
    expected = (_kl(logits[0], logits[1]) + _kl(logits[2], logits[1])) / 2
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    value.backward()
    own = torch.autograd.grad(expected, logits[1])[0]
    assert torch.allclose(logits[1].grad, own, atol=1e-12)
    assert logits[0].grad is None and logits[2].grad is None  # the others' outputs are targets, not trained


def test_each_network_gets_its_labels_loss_plus_the_weighted_mutual_term():
    torch.manual_seed(0)
    nets = [nn.Linear(6, 4).double() for _ in range(3)]
    distiller = MutualDistiller(nets[0], nets[1:], 0.5).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    logits, loss, terms = distiller.step(x, y, torch.arange(8), 0)
    outs = [net(x) for net in nets]
    mutual = [sum(_kl(outs[j], outs[i]) for j in range(3) if j != i) / 2 for i in range(3)]
    assert loss.item() == pytest.approx(sum(F.cross_entropy(o, y) + 0.5 * m for o, m in zip(outs, mutual)).item(),
                                        abs=1e-12)
    assert set(terms) == {"ce", "mutual", "peer1/ce", "peer1/mutual", "peer2/ce", "peer2/mutual"}
    assert terms["peer2/mutual"].item() == pytest.approx(mutual[2].item(), abs=1e-12)
    assert torch.equal(logits, outs[0])
    loss.backward()  # the student's weights move by its own loss only
    own = torch.autograd.grad(F.cross_entropy(nets[0](x), y) + 0.5 * mutual[0], nets[0].weight)[0]
    assert torch.allclose(nets[0].weight.grad, own, atol=1e-12)
    assert len(distiller.trained_parameters()) == 6


def test_mutual_trains_in_the_distill_stage_with_or_without_a_teacher():
    alone = plan_stages(Config(baseline=True, distill=True, mutual=["cnn_tiny"]))
    assert [s.name for s in alone] == ["baseline", "distill"] and alone[1].teacher is None
    taught = plan_stages(Config(train_teacher=True, distill=True, mutual=["cnn_tiny"]))
    assert taught[1].teacher is not None


@pytest.mark.slow
def test_peers_get_their_own_checkpoints_rows_and_curves_and_are_reused_on_resume(tiny_data, tmp_path, capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--baseline", "--distill",
             "--mutual", "cnn_tiny", "cnn_small", "--epochs", "2"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    stage = tmp_path / "kd" / "distill" / "version_0"
    rows = {r.stage: r for r in find_results([str(tmp_path)])}
    assert set(rows) == {"baseline", "distill", "peer1", "peer2"}
    assert rows["distill"].kd_loss == rows["peer1"].kd_loss == "mutual"
    assert (rows["peer1"].arch, rows["peer2"].arch) == ("cnn_tiny", "cnn_small")
    assert rows["peer2"].params != rows["peer1"].params and len(rows["peer2"].val_top1) == 2
    assert rows["peer2"].log_dir == stage / "peers" / "peer2"
    peer_config = yaml.safe_load((stage / "peers" / "peer2" / "config.yaml").read_text())
    assert peer_config["student_arch"] == "cnn_small" and peer_config["mutual"] == ["cnn_tiny", "cnn_tiny"]
    assert "peer2 (mutual)" in out and "cnn_small" in out
    tags = _scalar_tags(stage)
    assert {"val/peer1/top1", "val/peer2/top1", "train/peer2/mutual_epoch", "val/top1"} <= tags
    report = next((tmp_path / "kd" / "report").rglob("report.md")).read_text()
    assert "| peer2 (mutual) | cnn_small |" in report

    # Each peer's last.ckpt is a kd checkpoint of that network: --evaluate scores it as its row's last epoch.
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / "eval"), "--student_arch",
                 "cnn_small", "--evaluate", str(stage / "peers" / "peer2" / "checkpoints" / "last.ckpt")]) == 0
    assert f"top-1 {rows['peer2'].top1:.2f} %" in capsys.readouterr().out

    assert main([*flags, "--resume"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
    again = {r.stage: r for r in find_results([str(tmp_path / "kd")])}
    assert again["peer2"].val_top1 == rows["peer2"].val_top1 and not (stage.parent / "version_1").exists()


def _scalar_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.slow
def test_a_killed_mutual_stage_resumes_every_network_to_the_uninterrupted_result(tiny_data, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_NET)

    def flags(out: str) -> list[str]:
        return [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path / out), "--distill",
                "--student_arch", f"{tmp_path / 'slow.py'}:Slow", "--mutual", "cnn_tiny", "--batch_size", "8",
                "--epochs", "3"]

    stage = tmp_path / "killed" / "kd" / "distill" / "version_0"
    process = start_cli(flags("killed"), tmp_path)
    wait_mid_epoch(process, stage)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (stage / "peers" / "peer1" / "result.json").exists()
    assert main([*flags("killed"), "--resume"]) == 0
    assert main(flags("straight")) == 0
    straight = tmp_path / "straight" / "kd" / "distill" / "version_0"
    for folder in ("", "peers/peer1"):
        resumed, reference = (json.loads((d / folder / "result.json").read_text()) for d in (stage, straight))
        assert len(resumed["val_top1"]) == 3 and resumed["val_top1"] == reference["val_top1"]
        assert resumed["best_epoch"] == reference["best_epoch"]
    a, b = (torch.load(d / "peers" / "peer1" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
            for d in (stage, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_with_a_teacher_every_network_also_learns_from_its_cached_logits(tiny_data, tmp_path, capsys):
    flags = [*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), "--train_teacher", "--distill",
             "--mutual", "cnn_tiny", "--teacher_cache", str(tmp_path / "cache")]
    assert main(flags) == 0
    rows = {r.stage: r for r in find_results([str(tmp_path / "kd")])}
    assert rows["distill"].kd_loss == rows["peer1"].kd_loss == "kl_softmax+mutual"
    assert rows["peer1"].teacher_top1 == rows["distill"].teacher_top1 is not None
    assert "teacher cache:" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--baseline", "--mutual", "cnn_tiny"], "--mutual cnn_tiny trains peers beside the student in its distill "
                                            "stage: add --distill"),
    (["--distill", "--mutual", "cnn_tiny", "--ema", "0.9"], "--mutual cnn_tiny with --ema"),
    (["--distill", "--mutual", "cnn_tiny", "--optimizer", "dot"], "--mutual cnn_tiny with --optimizer dot"),
    (["--train_teacher", "--distill", "--mutual", "cnn_tiny", "--born_again", "2"], "--mutual cnn_tiny with "
                                                                                     "--born_again"),
    (["--distill", "--mutual", "cnn_tiny", "--kd_loss", "uskd"], "--mutual cnn_tiny with --kd_loss uskd"),
    (["--train_teacher", "--distill", "--mutual", "cnn_tiny", "--kd_loss", "crd"], "--kd_loss crd"),
    (["--distill", "--mutual", "cnn_tiny", "--teacher_cache", "c"], "--teacher_cache and no teacher"),
    (["--distill", "--mutual", "cnn_tiny", "--tune", "2"], "--tune with --mutual"),
    (["--distill", "--mutual", "no_such_net"], "--mutual"),
])
def test_mutual_refuses_what_cannot_work_in_one_line(tiny_data, tmp_path, capsys, flags, message):
    assert main([*FAST, "--data_dir", str(tiny_data), "--output_dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.rglob("*.ckpt"))


def test_a_peer_named_by_file_is_user_code_the_user_named(tmp_path):
    from kd.deploy.commands import named_archs

    assert f"{tmp_path}/net.py:Net" in named_archs(Config(distill=True, mutual=[f"{tmp_path}/net.py:Net"]))
