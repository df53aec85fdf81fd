"""Contrastive losses: pure functions over embeddings, and the named losses the loop calls.

`temperature` is a temperature: logits = cosine / temperature (scale = 1 / temperature).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from embedft.config import LossConfig
from embedft.data.batches import Batch
from embedft.errors import ConfigError

log = logging.getLogger(__name__)


def _columns(keys: torch.Tensor) -> torch.Tensor:
    """(n, W) keys from (n,) or (n, W) ones; n may be 0 (a batch with no mined negative)."""
    return keys if keys.ndim == 2 else keys[:, None]


def false_negative_mask(anchor_keys: torch.Tensor, cand_keys: torch.Tensor,
                        anchor_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """(B, C) True where candidate j must not be a negative for anchor i.

    A candidate is excluded when it shares a label/group key (key >= 0) with the anchor or is
    the very same text. Keys are (B,) and (C,), one per text, or (B, Wa) and (C, Wc), every key
    of each text padded with -1 (a title of two products is a positive of both). The caller keeps
    each anchor's own positive (column i).
    """
    a, c = _columns(anchor_keys), _columns(cand_keys)  # (B, Wa), (C, Wc); C may be 0
    out = anchor_ids[:, None] == cand_ids[None, :]  # (B, C): the same text
    # A join on the key of the (row, key) and (column, key) entries: memory in the matches, not in B x C x Wa x Wc
    # (a title such as "washing machine" is of dozens of products).
    ra, ia = torch.nonzero(a >= 0, as_tuple=True)
    rc, ic = torch.nonzero(c >= 0, as_tuple=True)
    ka, kc = a[ra, ia], c[rc, ic]
    kc, order = torch.sort(kc)
    rc = rc[order]
    lo = torch.searchsorted(kc, ka)
    n = torch.searchsorted(kc, ka, right=True) - lo  # columns sharing each (row, key) entry's key
    rows = torch.repeat_interleave(ra, n)
    start = torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n)  # per match: lo of its entry, less its offset
    out[rows, rc[start + torch.arange(len(rows), device=out.device)]] = True
    return out


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
                   temperature: float = 0.05, extra: torch.Tensor | None = None,
                   extra_ok: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over a batch of groups: every (anchor, positive) pair of one key, against the
    anchor's negatives (other keys); other positives of the anchor are masked out, never negatives.

    anchors (N, D) and cands (N, D) are the same N texts (query and document form; the same
    tensor when they coincide), keys (N,) their group, same_text (N, N) True where i and j are
    one text (never a pair, never a negative). For a pair (i, p):
    loss = -log(exp(s_ip) / (exp(s_ip) + sum_neg exp(s_in))), averaged over i's pairs, then
    over the anchors that have a pair; 0 when none has. `extra` (M, D) are further negative
    candidates (mined hard negatives, document form), `extra_ok` (N, M) True where candidate m may
    be a negative of anchor i; they join every anchor's negatives, never its pairs. `exclude` (N, N)
    True where j may not be i's negative although its key differs (a text of two groups: a positive
    of both); such (i, j) are neither pair nor negative.
    """
    logits = anchors @ cands.T / temperature  # (N, N)
    same_key = keys[:, None] == keys[None, :]  # (N, N)
    pos = same_key & ~same_text
    neg = ~same_key & ~same_text
    if exclude is not None:
        neg &= ~exclude
    neg_logits = logits.masked_fill(~neg, float("-inf"))  # (N, N)
    if extra is not None and extra.shape[0] > 0:
        extra_logits = (anchors @ extra.T / temperature).masked_fill(~extra_ok, float("-inf"))  # (N, M)
        neg_logits = torch.cat([neg_logits, extra_logits], dim=1)  # (N, N + M)
    lse_neg = torch.logsumexp(neg_logits, dim=1, keepdim=True)  # (N, 1)
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


def batch_loss(emb: torch.Tensor, batch: Batch, gather: dict[str, Any], text_keys: np.ndarray,
               loss_cfg: LossConfig) -> torch.Tensor:
    """InfoNCE for a batch given the embeddings of its unique sequences (N, D). `text_keys` are each
    training text's keys for the false-negative masks: (T,) or (T, W) (`PairSource.keys`)."""
    dev = emb.device
    if batch.positives is None:
        return _group_batch_loss(emb, batch, gather, text_keys, loss_cfg)
    q = emb[: gather["n_q"]][torch.as_tensor(gather["q_inv"], device=dev)]  # (B, D)
    d_all = emb[gather["n_q"]:][torch.as_tensor(gather["d_inv"], device=dev)]  # (valid docs, D)
    B = len(batch.anchors)
    docs = np.concatenate([batch.positives, batch.negatives.reshape(-1)]) if batch.negatives is not None \
        else batch.positives
    valid = gather["valid"]
    d_ids = docs[valid]
    p = d_all[:B]
    n = d_all[B:] if len(d_ids) > B else None
    cand_keys = _keys(text_keys, d_ids, dev)  # (C, W)
    anchor_keys = torch.as_tensor(batch.anchor_keys, device=dev)
    anchor_ids = torch.as_tensor(batch.anchors, device=dev)
    # An anchor's row key, and every key of its text: a text of two groups has a positive in both.
    row_keys = torch.cat([anchor_keys[:, None], _keys(text_keys, batch.anchors, dev)], dim=1)  # (B, 1 + W)
    exclude = false_negative_mask(row_keys, cand_keys, anchor_ids, torch.as_tensor(d_ids, device=dev))
    exclude_sym = None
    if loss_cfg.symmetric:
        pos_keys = torch.cat([anchor_keys[:, None], _keys(text_keys, batch.positives, dev)], dim=1)
        exclude_sym = false_negative_mask(pos_keys, row_keys, torch.as_tensor(batch.positives, device=dev), anchor_ids)
    loss = info_nce(q, p, n, temperature=loss_cfg.temperature, exclude=exclude, symmetric=loss_cfg.symmetric,
                    exclude_sym=exclude_sym)
    if loss_cfg.label_weight > 0 and batch.anchor_labels is not None:
        labels = torch.as_tensor(batch.anchor_labels, device=dev)
        loss = loss + loss_cfg.label_weight * label_contrastive(torch.cat([q, p]), torch.cat([labels, labels]),
                                                                temperature=loss_cfg.label_temperature)
    return loss


def _group_batch_loss(emb: torch.Tensor, batch: Batch, gather: dict[str, Any], text_keys: np.ndarray,
                      loss_cfg: LossConfig) -> torch.Tensor:
    dev = emb.device
    inv = torch.as_tensor(gather["q_inv"], device=dev)
    n = gather["n_q"]
    q = emb[:n][inv]  # (B, D)
    d = emb[n:2 * n][inv] if gather["two_forms"] else q
    ids = torch.as_tensor(batch.anchors, device=dev)
    keys = torch.as_tensor(batch.anchor_keys, device=dev)
    row_keys = torch.cat([keys[:, None], _keys(text_keys, batch.anchors, dev)], dim=1)  # (B, 1 + W)
    extra = extra_ok = None
    if "neg_ids" in gather:  # mined negatives (`mining.Miner`): never of the anchor's group, never the anchor
        neg_ids = gather["neg_ids"]
        extra = emb[gather["neg_start"]:gather["neg_start"] + len(neg_ids)]  # (M, D)
        extra_ok = ~false_negative_mask(row_keys, _keys(text_keys, neg_ids, dev), ids,
                                        torch.as_tensor(neg_ids, device=dev))  # (B, M)
    loss = group_info_nce(q, d, keys, ids[:, None] == ids[None, :], temperature=loss_cfg.temperature,
                          extra=extra, extra_ok=extra_ok, exclude=false_negative_mask(row_keys, row_keys, ids, ids))
    if loss_cfg.label_weight > 0 and batch.anchor_labels is not None:
        loss = loss + loss_cfg.label_weight * label_contrastive(d, torch.as_tensor(batch.anchor_labels, device=dev),
                                                                temperature=loss_cfg.label_temperature)
    return loss


def _keys(text_keys: np.ndarray, ids: np.ndarray, dev: torch.device) -> torch.Tensor:
    """(n, W) the keys of texts `ids`: rows of a (T, W) key-set array, or a (T,) one as one column."""
    return _columns(torch.as_tensor(text_keys[ids], device=dev))


# ---------------------------------------------------------------------------------------
# Named losses: what `loss.name` chooses and the training loop calls, knowing no more than this.


class BatchLoss(Protocol):
    """A training loss over one batch: (N, D) embeddings of the batch's unique sequences -> a scalar.

    `gather` says which rows are whose (`training.tokens.batch_sequences`); `text_keys` (T, W) are
    each training text's group/label keys (-1 for none; `PairSource.keys`), for false-negative masks.
    """

    def __call__(self, emb: torch.Tensor, batch: Batch, gather: dict[str, Any],
                 text_keys: np.ndarray) -> torch.Tensor: ...


@dataclass(frozen=True)
class InfoNCELoss:
    """InfoNCE with in-batch and hard negatives (pairs), every pair of a group against the other
    groups (group batches), plus the label term when `loss.label_weight` > 0."""

    cfg: LossConfig

    def __call__(self, emb: torch.Tensor, batch: Batch, gather: dict[str, Any], text_keys: np.ndarray) -> torch.Tensor:
        return batch_loss(emb, batch, gather, text_keys, self.cfg)


# loss.name -> the loss built from the loss config. A new loss: a class here and one line below.
LOSSES: dict[str, Callable[[LossConfig], BatchLoss]] = {
    "infonce": InfoNCELoss,
}


def build_loss(cfg: LossConfig) -> BatchLoss:
    """The loss `loss.name` names, or a ConfigError listing the known ones."""
    if cfg.name not in LOSSES:
        raise ConfigError(f"loss.name={cfg.name!r}: unknown loss; use one of {', '.join(sorted(LOSSES))}",
                          ("loss.name",))
    return LOSSES[cfg.name](cfg)
