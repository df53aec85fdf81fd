"""Per-epoch validation: recall@k on a capped retrieval task, and the loss on fixed batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from embedft.config import GROUP_SAMPLINGS
from embedft.data.batches import PairSource, build_pair_source, epoch_batches
from embedft.data.examples import Examples, retrieval_task
from embedft.errors import DataError
from embedft.modeling.encoder import Encoder
from embedft.modeling.runtime import lora_input_casts, uses_amp
from embedft.training.losses import BatchLoss
from embedft.training.step import embed
from embedft.training.tokens import TokenCache, batch_sequences

log = logging.getLogger(__name__)


@dataclass
class ValSet:
    """Per-epoch validation: retrieval queries/corpus (token ids) and a few fixed loss batches."""

    query_ids: list[list[int]]
    corpus_ids: list[list[int]]
    positives: list[np.ndarray]  # per query: corpus indices
    self_ids: np.ndarray | None  # per query: its own corpus index (excluded), or None
    loss_source: PairSource | None = None
    loss_batches: int = 4


@torch.no_grad()
def validate(encoder: Encoder, val: ValSet, text_keys_cache: tuple[PairSource, TokenCache] | None,
             loss_fn: BatchLoss, batch_size: int, device: torch.device, seed: int, k: int = 10,
             sampling: str = "random", group_size: int = 4) -> dict[str, float]:
    """Validation recall@k (standard: over all positives) by exact search, and validation loss on fixed batches (drawn as the
    training batches are, random groups standing in for similar ones)."""
    from embedft.evaluation.index import exact_search
    from embedft.evaluation.metrics import recall_at_k

    q = encoder.encode_ids(val.query_ids, device=device)
    c = encoder.encode_ids(val.corpus_ids, device=device)
    kk = min(k, len(val.corpus_ids) - (1 if val.self_ids is not None else 0))
    _, ranked = exact_search(c, q, kk, self_ids=val.self_ids)
    out = {f"val/recall@{k}": recall_at_k(ranked, val.positives, kk)}
    if text_keys_cache is not None:
        src, cache = text_keys_cache
        losses = []
        encoder.eval()
        sampling = "groups" if sampling in GROUP_SAMPLINGS else "random"
        amp = uses_amp(encoder, device)
        with lora_input_casts(encoder, enabled=not amp):
            for i, batch in enumerate(epoch_batches(src, batch_size, seed, 0, sampling, group_size=group_size)):
                if i >= val.loss_batches:
                    break
                seqs, gather = batch_sequences(batch, cache)
                emb = embed(encoder, seqs, device, amp=amp)
                losses.append(float(loss_fn(emb, batch, gather, src.text_keys)))
        encoder.train()
        if losses:
            out["val/loss"] = float(np.mean(losses))
    return out


def build_val_set(encoder, eval_ex: Examples, max_queries: int, seed: int):
    """Per-epoch validation: a capped retrieval task and a few loss batches from the eval split."""
    from embedft.training.validation import ValSet

    task = retrieval_task(eval_ex, max_queries=max_queries, seed=seed) if eval_ex.shape != "labeled" else None
    try:
        loss_src = build_pair_source(eval_ex)
    except DataError:
        loss_src = None
    if task is None or len(task) == 0:
        return None
    return ValSet(encoder.tokenize(task.queries, is_query=True), encoder.tokenize(task.corpus),
                  task.positives, task.self_ids, loss_source=loss_src)
