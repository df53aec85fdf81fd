"""Contrastive losses as pure functions over embeddings.

`temperature` is a temperature: logits = cosine / temperature (scale = 1 / temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negative_mask(anchor_keys: torch.Tensor, cand_keys: torch.Tensor,
                        anchor_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """(B, C) True where candidate j must not be a negative for anchor i.

    A candidate is excluded when it shares the anchor's label/group key (key >= 0) or is
    the very same text. The caller keeps each anchor's own positive (column i).
    """
    same_key = (anchor_keys[:, None] == cand_keys[None, :]) & (cand_keys[None, :] >= 0)  # (B, C)
    same_text = anchor_ids[:, None] == cand_ids[None, :]  # (B, C)
    return same_key | same_text


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None, *,
             temperature: float = 0.05, exclude: torch.Tensor | None = None,
             symmetric: bool = False, exclude_sym: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with in-batch (and optional hard) negatives.

    anchors (B, D), positives (B, D), negatives (B*H, D) or None, all L2-normalised.
    Candidates for anchor i are all positives then all negatives: (B + B*H,). The target is
    column i. `exclude` (B, B + B*H) marks false negatives; they get -inf (column i never).
    With `symmetric`, adds positive_i -> anchors (B, B) with `exclude_sym` and averages.
    """
    B = anchors.shape[0]
    cands = positives if negatives is None or negatives.numel() == 0 else torch.cat([positives, negatives])  # (C, D)
    logits = anchors @ cands.T / temperature  # (B, C)
    target = torch.arange(B, device=anchors.device)
    logits = _mask(logits, exclude, target)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        logits_t = positives @ anchors.T / temperature  # (B, B)
        loss = 0.5 * (loss + F.cross_entropy(_mask(logits_t, exclude_sym, target), target))
    return loss


def _mask(logits: torch.Tensor, exclude: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    if exclude is None:
        return logits
    ex = exclude[:, : logits.shape[1]].clone()
    ex[target, target] = False  # the positive itself is never excluded
    return logits.masked_fill(ex, float("-inf"))
