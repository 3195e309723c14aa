"""Lightning callbacks of every stage: the validation history kept in checkpoints, and per-epoch seeding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl

from kd.seeding import draw_seed

if TYPE_CHECKING:
    from kd.data.loaders import ImageDataModule


class History(pl.Callback):
    """Each epoch's validation metrics (accuracies in percent); saved in checkpoints for --resume."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.epochs.append({"epoch": trainer.current_epoch, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "unit": "percent"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A checkpoint of a kd that logged accuracies as fractions: its history and best score read as percent."""
        states = checkpoint.get("callbacks", {})
        mine = states.get(self.state_key)
        if not mine or mine.get("unit") == "percent":
            return
        mine["epochs"] = [{k: 100 * v if _is_accuracy(k) else v for k, v in epoch.items()} for epoch in mine["epochs"]]
        for state in states.values():
            if state.get("monitor") == "val/top1":  # ModelCheckpoint: the best so far must compare with percent
                state |= {key: 100 * state[key] for key in ("best_model_score", "current_score", "kth_value")
                          if state.get(key) is not None}
                state["best_k_models"] = {path: 100 * score for path, score in state.get("best_k_models", {}).items()}


def _is_accuracy(metric: str) -> bool:
    """Whether ``metric`` is a validation accuracy or agreement (percent since kd logs them so)."""
    return metric.startswith("val/") and metric.endswith(("top1", "top5", "agreement"))


class EpochSeeding(pl.Callback):
    """Makes each epoch's randomness a function of (seed, epoch): batch order, crops, dropout.

    An epoch then runs the same whether the run went straight through or was resumed before it.
    """

    def __init__(self, data: ImageDataModule, seed: int) -> None:
        self.data, self.seed = data, seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data.set_epoch(trainer.current_epoch)
        pl.seed_everything(draw_seed(self.seed, trainer.current_epoch) % 2**32, verbose=False)
