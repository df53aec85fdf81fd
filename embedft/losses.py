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


def group_info_nce(anchors: torch.Tensor, cands: torch.Tensor, keys: torch.Tensor, same_text: torch.Tensor, *,
                   temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE over a batch of groups: every (anchor, positive) pair of one key, against the
    anchor's negatives (other keys); other positives of the anchor are masked out, never negatives.

    anchors (N, D) and cands (N, D) are the same N texts (query and document form; the same
    tensor when they coincide), keys (N,) their group, same_text (N, N) True where i and j are
    one text (never a pair, never a negative). For a pair (i, p):
    loss = -log(exp(s_ip) / (exp(s_ip) + sum_neg exp(s_in))), averaged over i's pairs, then
    over the anchors that have a pair; 0 when none has.
    """
    logits = anchors @ cands.T / temperature  # (N, N)
    same_key = keys[:, None] == keys[None, :]  # (N, N)
    pos = same_key & ~same_text
    neg = ~same_key & ~same_text
    lse_neg = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)  # (N, 1)
    pair_loss = torch.logaddexp(logits, lse_neg) - logits  # (N, N): -log p(pair) for every (i, j)
    n_pos = pos.sum(1)  # (N,)
    has = n_pos > 0
    if not bool(has.any()):
        return anchors.sum() * 0.0
    return (pair_loss.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has]).mean()


def label_contrastive(emb: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over labels such as categories.

    emb (N, D) L2-normalised, labels (N,) int. For item i, every other item with its label is
    a positive and all other items are the denominator: -mean_p log softmax_i(p). Averaged
    over the items that have a positive; 0 when none has. Next to the matching InfoNCE it
    keeps items of one category near each other, which kNN classification relies on.
    """
    N = emb.shape[0]
    eye = torch.eye(N, dtype=torch.bool, device=emb.device)
    logits = (emb @ emb.T / temperature).masked_fill(eye, float("-inf"))  # (N, N), self excluded
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (N, N)
    pos = (labels[:, None] == labels[None, :]) & ~eye  # (N, N)
    n_pos = pos.sum(1)  # (N,)
    has = n_pos > 0
    if not bool(has.any()):
        return emb.sum() * 0.0
    per_item = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has])  # (N_has,)
    return per_item.mean()
