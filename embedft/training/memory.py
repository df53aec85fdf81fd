"""Cross-batch memory (XBM, Wang et al. 2020): the embeddings of the last steps' texts, kept without
graph, join each anchor's negatives for free (no extra forward pass).

A step's loss reads the memory as it was before the step (`view`), then the step's own document-form
embeddings go in (`push`), oldest out first. Rows of the anchor's group or label, and the anchor's own
text, are never its negatives (`losses.false_negative_mask`). The memory is part of a checkpoint, so
`--resume` goes on with the same negatives.
"""

from __future__ import annotations

import numpy as np
import torch


class NegativeMemory:
    """A FIFO of at most `size` (embedding, key, text id) rows; size 0 holds nothing."""

    def __init__(self, size: int):
        self.size = size
        self.emb: torch.Tensor | None = None  # (n, D), newest last
        self.keys = np.zeros(0, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int64)

    def view(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray] | None:
        """(emb (n, D), keys (n,), text ids (n,)) of what is held, or None when empty."""
        if self.emb is None or not len(self.ids):
            return None
        return self.emb, self.keys, self.ids

    def push(self, emb: torch.Tensor, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add a step's rows (emb (m, D), no graph is kept) and drop the oldest beyond `size`."""
        if self.size == 0:
            return
        emb = emb.detach().float()
        if self.emb is not None:
            emb = torch.cat([self.emb, emb.to(self.emb.device)])
            keys, ids = np.concatenate([self.keys, keys]), np.concatenate([self.ids, ids])
        self.emb = emb[-self.size:]
        self.keys = np.asarray(keys, dtype=np.int64)[-self.size:]
        self.ids = np.asarray(ids, dtype=np.int64)[-self.size:]

    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps (`save_checkpoint(arrays=...)`)."""
        if self.emb is None:
            return {}
        return {"memory_emb": self.emb.cpu().numpy(), "memory_keys": self.keys, "memory_ids": self.ids}

    def load(self, saved: dict[str, np.ndarray] | None, device: torch.device) -> None:
        """Take a resumed run's memory from its checkpoint arrays (nothing when it held none)."""
        if saved is None or "memory_emb" not in saved:
            return
        self.emb = torch.as_tensor(saved["memory_emb"], device=device)
        self.keys, self.ids = saved["memory_keys"], saved["memory_ids"]
