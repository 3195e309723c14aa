"""Deep mutual learning (Zhang et al. 2018, ``--mutual ARCH ...``): the student and its peers trained together.

Each network learns from the labels (through the objective, with a teacher if the run has one) and from every
other network's softmax: its mutual term is the mean over the others of KL(p_other || p_own) at temperature 1,
the others' outputs detached (each network's loss moves its own weights only, as with one optimiser per
network; kd's optimisers update each parameter from its own gradient and state, so one optimiser over all of
them makes the very same updates). The peers are saved with the student in the stage's checkpoints
(``peers.N.*``) and, each on its own, as kd checkpoints in ``<stage log>/peers/peerN/checkpoints``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from kd.losses.logits import kl_softmax
from kd.train.checkpoint_io import AtomicCheckpointIO
from kd.train.distiller import Distiller, Step
from kd.train.mixing import hard_labels

PEERS_FOLDER = "peers"


def peer_name(number: int) -> str:
    """The stage name of the ``number``-th peer (from 1): its result row, log folder and metric prefix."""
    return f"peer{number}"


def mutual_term(logits: list[torch.Tensor], own: int) -> torch.Tensor:
    """Network ``own``'s mutual term: the mean over the other networks of KL(their softmax || its softmax) at T = 1,
    their logits detached."""
    others = [other.detach() for index, other in enumerate(logits) if index != own]
    return torch.stack([kl_softmax(logits[own], other, 1.0) for other in others]).mean()


class MutualDistiller(Distiller):
    """A :class:`Distiller` whose student trains together with ``peers``, each network adding ``mutual_weight``
    times its mutual term to its own loss (the objective's with a teacher, else the cross-entropy on labels).

    Only losses of logits apply (checked by the run): a feature loss would need hooks and connectors per network.
    """

    def __init__(self, model: nn.Module, peers: list[nn.Module], mutual_weight: float, **options: Any) -> None:
        super().__init__(model, **options)
        self.peers = nn.ModuleList(peers)
        self.mutual_weight = mutual_weight
        for peer in self.peers:
            peer.to(memory_format=self.memory_format)
            if options.get("compile"):
                peer.compile()

    @property
    def distilling(self) -> bool:
        return True

    def trained_parameters(self) -> list[nn.Parameter]:
        return super().trained_parameters() + list(self.peers.parameters())

    def peer_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each peer's logits for a batch, in order."""
        x = x.contiguous(memory_format=self.memory_format)
        return [peer(x) for peer in self.peers]

    def step(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, epoch: int) -> Step:
        """The student's logits, the sum of every network's loss, and the terms (the peers' prefixed ``peerN/``)."""
        x = x.contiguous(memory_format=self.memory_format)
        logits = [self.model(x), *(peer(x) for peer in self.peers)]
        teaches = self.learns_from_objective and self.has_teacher
        teacher = self.teacher_outputs(x, indices, epoch)[0] if teaches else None
        total, terms = torch.zeros((), device=x.device), {}
        for index, own in enumerate(logits):
            if self.learns_from_objective:
                loss, own_terms = self.objective(own, teacher, hard_labels(y), targets=y, student_features={},
                                                 teacher_features={}, connected_features={}, indices=indices,
                                                 epoch=epoch)
            else:
                loss, own_terms = self.label_loss(own, y)
            mutual = mutual_term(logits, index)
            prefix = f"{peer_name(index)}/" if index else ""
            terms |= {prefix + name: value for name, value in own_terms.items()} | {f"{prefix}mutual": mutual}
            total = total + loss + self.mutual_weight * mutual
        return Step(logits[0], total, terms)


class PeerCheckpoints(pl.Callback):
    """Saves each peer as a kd checkpoint of its own after every validation: ``last.ckpt``, and ``best.ckpt`` when its
    val/peerN/top1 is its best yet (the best scores are kept in the stage's checkpoints, for --resume)."""

    def __init__(self, folder: Path, archs: list[str]) -> None:
        self.folder, self.archs = folder, archs
        self.best: list[float | None] = [None] * len(archs)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for number, (arch, peer) in enumerate(zip(self.archs, pl_module.distiller.peers), start=1):
            checkpoint = {"state_dict": {f"model.{k}": v.detach().cpu() for k, v in peer.state_dict().items()},
                          "hyper_parameters": dict(pl_module.hparams) | {"arch": arch},
                          "epoch": trainer.current_epoch}
            folder = self.folder / peer_name(number) / "checkpoints"
            AtomicCheckpointIO().save_checkpoint(checkpoint, folder / "last.ckpt")
            score = float(trainer.callback_metrics[f"val/{peer_name(number)}/top1"])
            if self.best[number - 1] is None or score > self.best[number - 1]:
                self.best[number - 1] = score
                AtomicCheckpointIO().save_checkpoint(checkpoint, folder / "best.ckpt")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = list(state_dict["best"])
