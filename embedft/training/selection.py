"""Model selection and early stopping on the per-epoch validation metric.

The loop hands each epoch's validation metrics to `Selection.update`; it keeps a copy of the
LoRA weights of the best epoch so far (higher is better), says when `train.patience` epochs in
a row brought no improvement, and puts the best weights back at the end. Its state travels in
the checkpoint, so a resumed run selects and stops exactly as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from embedft.modeling.encoder import Encoder


def _trainable(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in encoder.named_parameters() if v.requires_grad}


@dataclass
class Selection:
    """The best epoch by `metric` so far, its LoRA weights, and the epochs since it."""

    metric: str  # e.g. val/macro_f1, val/recall@10: higher is better
    patience: int | None = None  # stop after this many epochs without improvement; None: never
    keep_weights: bool = True  # train.select_best: keep the best epoch's weights to put back at the end
    best_value: float = float("-inf")
    best_loss: float = float("inf")  # val/loss of the best epoch: breaks ties of a saturated metric
    best_epoch: int = 0
    bad_epochs: int = 0
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def update(self, metrics: dict[str, float], epoch: int, encoder: Encoder) -> bool:
        """Record one epoch's validation metrics; True when it is the best so far. A tie on the metric
        (recall@10 at 1.0 on easy data, say) goes to the lower validation loss, else to the earlier epoch."""
        value = float(metrics[self.metric])
        loss = float(metrics.get("val/loss", float("inf")))
        if value > self.best_value or (value == self.best_value and loss < self.best_loss):
            self.best_value, self.best_loss, self.best_epoch, self.bad_epochs = value, loss, epoch, 0
            if self.keep_weights:
                self.weights = _trainable(encoder)
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether `patience` epochs in a row brought no improvement."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def restore(self, encoder: Encoder) -> bool:
        """Put the best epoch's LoRA weights back into the encoder; False when none were kept."""
        if self.weights is None:
            return False
        params = dict(encoder.named_parameters())
        with torch.no_grad():
            for k, v in self.weights.items():
                params[k].copy_(v)
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return {"metric": self.metric, "best_value": self.best_value, "best_loss": self.best_loss,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` gave (from a checkpoint of the same run)."""
        self.best_value, self.best_epoch = float(state["best_value"]), int(state["best_epoch"])
        self.best_loss = float(state.get("best_loss", float("inf")))
        self.bad_epochs, self.weights = int(state["bad_epochs"]), state["weights"]
