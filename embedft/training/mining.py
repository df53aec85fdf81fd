"""Hard negatives and neighbouring groups, found with the current encoder by exact search."""

from __future__ import annotations

import logging

import numpy as np
import torch

from embedft.data.batches import PairSource, group_keys
from embedft.modeling.encoder import Encoder
from embedft.training.tokens import TokenCache

log = logging.getLogger(__name__)


@torch.no_grad()
def mine_hard_negatives(encoder: Encoder, src: PairSource, cache: TokenCache, n: int, device: torch.device,
                        skip_top: int = 0) -> np.ndarray:
    """(N_anchors, n) text ids of the nearest texts with a different key, by the current encoder."""
    from embedft.evaluation.index import exact_search

    docs = encoder.encode_ids(cache.docs(range(len(src.texts))), device=device)
    if not cache.two_forms:  # no query instruction: an anchor's query vector is its doc vector
        queries = docs[src.anchors]
    else:
        queries = encoder.encode_ids(cache.queries(src.anchors), device=device)
    depth = min(len(docs), n + skip_top + 32)
    _, ranked = exact_search(docs, queries, depth)
    out = np.full((src.n_anchors, n), -1, dtype=np.int64)
    for i in range(src.n_anchors):
        cand = ranked[i][(ranked[i] >= 0)]
        cand = cand[(src.text_keys[cand] != src.anchor_keys[i]) & (cand != src.anchors[i])][skip_top:skip_top + n]
        out[i, : len(cand)] = cand
    return out


@torch.no_grad()
def group_neighbours(encoder: Encoder, src: PairSource, cache: TokenCache, device: torch.device,
                     m: int = 16) -> np.ndarray:
    """(n_groups, m) each training group's nearest other groups (positions into the sorted group
    keys, nearest first, -1 padded) by the cosine of their mean document embeddings."""
    from embedft.evaluation.index import exact_search

    keys = group_keys(src)  # the order group_batches indexes neighbours by
    texts = np.concatenate([src.members[int(k)] for k in keys.tolist()])
    owner = np.repeat(np.arange(len(keys)), [len(src.members[int(k)]) for k in keys.tolist()])
    emb = encoder.encode_ids(cache.docs(texts), device=device)  # (T, D)
    cent = np.zeros((len(keys), emb.shape[1]), dtype=np.float32)
    np.add.at(cent, owner, emb)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    out = np.full((len(keys), m), -1, dtype=np.int64)
    depth = min(len(keys) - 1, m)
    if depth >= 1:
        _, ranked = exact_search(cent, cent, depth, self_ids=np.arange(len(keys)))
        out[:, :depth] = ranked
    return out
