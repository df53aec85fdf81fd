"""Token ids of the training texts, each tokenized once, and a batch's unique sequences."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np

from embedft.data.batches import Batch
from embedft.modeling.encoder import Encoder

log = logging.getLogger(__name__)


class TokenCache:
    """Token ids of a PairSource's texts, as queries (with instruction) and as documents.

    A text is tokenized the first time a batch needs it (one tokenizer call per batch for the
    new ones), then kept: a run shorter than an epoch tokenizes only the texts it trains on.
    """

    def __init__(self, encoder: Encoder, texts: Sequence[str]):
        self.encoder, self.texts = encoder, texts
        self.two_forms = bool(encoder.spec.query_template)  # else a query is its document form
        self._docs: list[list[int] | None] = [None] * len(texts)
        self._queries = [None] * len(texts) if self.two_forms else self._docs

    def docs(self, idx: Iterable[int]) -> list[list[int]]:
        """Document-form ids of texts idx."""
        return self._get(self._docs, idx, is_query=False)

    def queries(self, idx: Iterable[int]) -> list[list[int]]:
        """Query-form ids of texts idx (the model's query instruction applied)."""
        return self._get(self._queries, idx, is_query=True)

    def _get(self, store: list, idx: Iterable[int], is_query: bool) -> list[list[int]]:
        idx = [int(i) for i in idx]
        new = [i for i in dict.fromkeys(idx) if store[i] is None]
        if new:
            for i, ids in zip(new, self.encoder.tokenize([self.texts[i] for i in new], is_query=is_query)):
                store[i] = ids
        return [store[i] for i in idx]


def batch_sequences(batch: Batch, cache: TokenCache) -> tuple[list[list[int]], dict[str, Any]]:
    """Unique sequences to embed for a batch, and how to gather them back.

    Duplicate texts in a batch are embedded once. Anchors use the query form. A group batch's
    texts are anchors and candidates at once: query form, then document form when it differs.
    The gather's `q_ids` (and a pairs batch's `d_ids`) are the text ids of the query-form (document-form) rows.
    """
    if batch.positives is None:
        u, inv = np.unique(batch.anchors, return_inverse=True)
        seqs = cache.queries(u) + (cache.docs(u) if cache.two_forms else [])
        gather = {"q_inv": inv, "n_q": len(u), "two_forms": cache.two_forms, "q_ids": u}
        if batch.negatives is not None:  # mined negatives: extra candidates, document form, after the texts
            neg = batch.negatives.reshape(-1)
            n_unique = np.unique(neg[neg >= 0])
            gather.update({"neg_start": len(seqs), "neg_ids": n_unique})
            seqs = seqs + cache.docs(n_unique)
        return seqs, gather
    q_unique, q_inv = np.unique(batch.anchors, return_inverse=True)
    docs = batch.positives if batch.negatives is None else np.concatenate(
        [batch.positives, batch.negatives.reshape(-1)])
    valid = docs >= 0
    d_unique, d_inv = np.unique(docs[valid], return_inverse=True)
    seqs = cache.queries(q_unique) + cache.docs(d_unique)
    return seqs, {"q_inv": q_inv, "d_inv": d_inv, "n_q": len(q_unique), "valid": valid, "q_ids": q_unique,
                  "d_ids": d_unique}
