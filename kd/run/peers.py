"""Deep mutual learning's peers (``--mutual``) as rows of their own: each peer's result.json and config.yaml, written
into ``<distill log>/peers/peerN`` beside its checkpoints when the stage ends, and read back when it is reused.

A peer's row is the distill stage's with the peer's own architecture, size, curve and checkpoints; its config.yaml
is the stage's seen from the peer (it the student, the student and the other peers its peers), so ``--report``
and ``--evaluate`` treat it as any other student.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from kd.config import Config, save_config
from kd.report.results import RESULT_FILE, StageResult
from kd.train.mutual import PEERS_FOLDER, peer_name


def save_peer_results(result: StageResult, epochs: list[dict[str, float]], config: Config,
                      peers: list[nn.Module]) -> list[StageResult]:
    """Write and return each peer's result, from the student's ``result`` and the stage's validation ``epochs``."""
    saved = []
    for number, (arch, peer) in enumerate(zip(config.mutual, peers), start=1):
        name = peer_name(number)
        folder = result.log_dir / PEERS_FOLDER / name
        best = max(epochs, key=lambda e: e[f"val/{name}/top1"])
        others = [config.student_arch, *(a for n, a in enumerate(config.mutual, start=1) if n != number)]
        save_config(replace(config, student_arch=arch, mutual=others), folder / "config.yaml")
        peer = replace(result, stage=name, arch=arch, params=sum(p.numel() for p in peer.parameters()),
                       best_top1=best[f"val/{name}/top1"], best_top5=best[f"val/{name}/top5"],
                       best_epoch=int(best["epoch"]), log_dir=folder,
                       best_checkpoint=folder / "checkpoints" / "best.ckpt",
                       val_top1=[e[f"val/{name}/top1"] for e in epochs], last_top5=epochs[-1][f"val/{name}/top5"])
        peer.save()
        saved.append(peer)
    return saved


def peer_results(result: StageResult) -> list[StageResult]:
    """The peers' results saved beside a finished distill stage's (none without --mutual), in order."""
    folder = Path(result.log_dir) / PEERS_FOLDER
    found = [path for path in folder.glob(f"peer*/{RESULT_FILE}") if path.parent.name.removeprefix("peer").isdigit()]
    found.sort(key=lambda path: int(path.parent.name.removeprefix("peer")))
    return [StageResult.load(path) for path in found]
