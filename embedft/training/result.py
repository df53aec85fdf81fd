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
