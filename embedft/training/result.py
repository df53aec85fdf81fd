"""What a run of the training loop returns (and a checkpoint keeps)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)  # per logged step
    val_history: list[dict[str, float]] = field(default_factory=list)  # per epoch
    train_seconds: float = 0.0
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    # Model selection on the validation split (embedft.training.selection): the epoch whose weights
    # the run ends with when train.select_best, its validation metric, and whether train.patience stopped it.
    best_epoch: int | None = None
    best_metric: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    # When the schedule's last epoch (of 2 or more) was the best and raised the metric over the one before
    # (`still_improving` in `training.loop`): the train.epochs the run's note suggests; None otherwise.
    suggested_epochs: int | None = None

    @property
    def still_improving(self) -> bool:
        """The model may still be improving, and more epochs may pay."""
        return self.suggested_epochs is not None
