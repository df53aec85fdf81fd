"""Retrieval and classification metrics as plain numpy functions.

Ranked retrieval results are an int array ``ranked`` of shape (Q, K) holding
corpus indices, best first, with -1 as padding (FAISS returns -1 when it has
fewer than K results). ``positives`` holds, per query, the relevant corpus
indices as a set or an array.

Kept numpy-only on purpose: evaluators import this module in light processes
(and tests) that should not pay for FAISS or torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "recall_at_k",
    "r_cap_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "knn_vote",
    "knn_predict",
    "accuracy",
    "macro_f1",
    "per_class_prf",
    "confusion_matrix",
    "retrieval_metrics",
    "classification_metrics",
    "classification_report",
]


Positives = Sequence[Iterable[int]]


def _hits(ranked: np.ndarray, positives: Positives, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (hits (Q, k) bool, n_pos (Q,) int) after validating the inputs."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D (queries, K) array of corpus ids, got shape {ranked.shape}")
    if not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must hold integer corpus ids, got dtype {ranked.dtype}")
    n_queries, n_cols = ranked.shape
    if len(positives) != n_queries:
        raise ValueError(
            f"ranked has {n_queries} queries but positives has {len(positives)} entries; "
            "pass one positive set per query"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n_cols:
        # Silently scoring fewer than k results would under-report the metric.
        raise ValueError(
            f"k={k} is larger than the {n_cols} ranked results per query; "
            f"search with at least k={k} neighbours or lower k"
        )

    pos_sets = [{int(doc) for doc in p} for p in positives]
    n_pos = np.fromiter((len(p) for p in pos_sets), dtype=np.int64, count=n_queries)
    n_empty = int((n_pos == 0).sum())
    if n_empty:
        raise ValueError(
            f"{n_empty} of {n_queries} queries have no positives; drop them before computing retrieval metrics"
        )

    top = ranked[:, :k]
    hits = np.zeros(top.shape, dtype=bool)
    for i, (row, pos) in enumerate(zip(top, pos_sets)):
        seen: set[int] = set()
        for j, doc in enumerate(row.tolist()):
            # A corpus id repeated in one ranking must count once, or recall could exceed 1.
            if doc in pos and doc not in seen:
                hits[i, j] = True
            seen.add(doc)
    return hits, n_pos


def recall_at_k(ranked: np.ndarray, positives: Positives, k: int) -> float:
    """Mean over queries of |top-k ∩ positives| / |positives| (standard recall, as trec_eval, ranx and MTEB)."""
    hits, n_pos = _hits(ranked, positives, k)
    return float(np.mean(hits.sum(axis=1) / n_pos))


def r_cap_at_k(ranked: np.ndarray, positives: Positives, k: int) -> float:
    """Mean over queries of |top-k ∩ positives| / min(|positives|, k): BEIR's R_cap@k, which a query
    with more than k positives can still bring to 1.0 (embedft called this recall@k before issue 29)."""
    hits, n_pos = _hits(ranked, positives, k)
    return float(np.mean(hits.sum(axis=1) / np.minimum(n_pos, k)))


def mrr_at_k(ranked: np.ndarray, positives: Positives, k: int) -> float:
    """Mean reciprocal rank of the first positive within the top k (0 when none)."""
    hits, _ = _hits(ranked, positives, k)
    first = hits.argmax(axis=1)
    rr = np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0)
    return float(rr.mean())


def ndcg_at_k(ranked: np.ndarray, positives: Positives, k: int) -> float:
    """Mean binary-relevance nDCG@k; the ideal DCG has min(|positives|, k) relevant results on top."""
    hits, n_pos = _hits(ranked, positives, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = hits @ discounts
    idcg = np.cumsum(discounts)[np.minimum(n_pos, k) - 1]
    return float(np.mean(dcg / idcg))


def retrieval_metrics(
    ranked: np.ndarray,
    positives: Positives,
    ks: Sequence[int] = (1, 5, 10, 100),
    prefix: str = "",
) -> dict[str, float]:
    """Flat dict of recall@k and r_cap@k for each k, mrr@10, ndcg@10 and n_queries, keys prefixed."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"{prefix}recall@{k}"] = recall_at_k(ranked, positives, k)
    for k in ks:
        out[f"{prefix}r_cap@{k}"] = r_cap_at_k(ranked, positives, k)
    out[f"{prefix}mrr@10"] = mrr_at_k(ranked, positives, 10)
    out[f"{prefix}ndcg@10"] = ndcg_at_k(ranked, positives, 10)
    out[f"{prefix}n_queries"] = float(len(positives))
    return out


def knn_vote(
    neighbor_labels: np.ndarray,
    neighbor_scores: np.ndarray,
    n_classes: int,
    weighted: bool = True,
) -> np.ndarray:
    """Predicted class per query by (similarity-weighted) neighbour vote; -1 when a query has no neighbours."""
    labels = np.asarray(neighbor_labels)
    scores = np.asarray(neighbor_scores, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"neighbor_labels {labels.shape} and neighbor_scores {scores.shape} must be 2-D arrays of the same shape"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"neighbor_labels must be integer class ids, got dtype {labels.dtype}")
    bad = (labels < -1) | (labels >= n_classes)
    if bad.any():
        raise ValueError(
            f"neighbor_labels must lie in [0, {n_classes}) or be -1 for padding; found {labels[bad][0]}"
        )

    n_queries = labels.shape[0]
    valid = labels >= 0
    rows = np.broadcast_to(np.arange(n_queries)[:, None], labels.shape)
    counts = np.zeros((n_queries, n_classes), dtype=np.float64)
    np.add.at(counts, (rows[valid], labels[valid]), 1.0)
    if weighted:
        votes = np.zeros((n_queries, n_classes), dtype=np.float64)
        np.add.at(votes, (rows[valid], labels[valid]), scores[valid])
    else:
        votes = counts.copy()

    # Inner-product scores can be negative, so a class nobody voted for (sum 0)
    # could otherwise beat every real candidate.
    votes[counts == 0] = -np.inf
    best = votes.max(axis=1, keepdims=True)
    # Tolerance so that sums differing only by float rounding still count as a tie.
    tied = np.isclose(votes, best, rtol=1e-9, atol=1e-12) & (counts > 0)

    # Tie-break: the nearest neighbour whose class is among the tied winners.
    safe_labels = np.where(valid, labels, 0)
    col_is_tied = tied[rows, safe_labels] & valid
    first_col = col_is_tied.argmax(axis=1)
    pred = labels[np.arange(n_queries), first_col].astype(np.int64)
    pred[~valid.any(axis=1)] = -1
    return pred


def knn_predict(index_labels: np.ndarray, scores: np.ndarray, ids: np.ndarray, n_classes: int,
                weighted: bool = True) -> np.ndarray:
    """`knn_vote` over a search's result: `ids` (Q, k) index rows (-1 pads, voting for nothing) with their
    `scores` (Q, k), over an index whose row r has class id `index_labels[r]`."""
    ids = np.asarray(ids)
    neighbours = np.where(ids >= 0, np.asarray(index_labels)[np.clip(ids, 0, None)], -1)  # (Q, k) class ids
    return knn_vote(neighbours, scores, n_classes, weighted=weighted)


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}; they must match")
    if y_true.size == 0:
        raise ValueError("y_true and y_pred are empty; need at least one labelled example")
    return y_true, y_pred


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of predictions equal to the true label."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def per_class_prf(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int]
) -> dict[int, tuple[float, float, float, int]]:
    """Per label (precision, recall, f1, support); 0/0 ratios are reported as 0."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    out: dict[int, tuple[float, float, float, int]] = {}
    for label in labels:
        tp = int(np.sum((y_true == label) & (y_pred == label)))
        n_pred = int(np.sum(y_pred == label))
        support = int(np.sum(y_true == label))
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = (float(precision), float(recall), float(f1), support)
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """Unweighted mean F1 over labels (default: y_true ∪ y_pred), skipping labels never seen nor predicted."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    if labels is None:
        labels = np.union1d(y_true, y_pred).tolist()
    present = set(np.union1d(y_true, y_pred).tolist())
    labels = [label for label in labels if label in present]
    if not labels:
        raise ValueError("none of the given labels occur in y_true or y_pred; check the label ids")
    prf = per_class_prf(y_true, y_pred, labels)
    return float(np.mean([prf[label][2] for label in labels]))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted; -1 predictions (no neighbours) are left out."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    bad_true = (y_true < 0) | (y_true >= n_classes)
    if np.any(bad_true):
        raise ValueError(f"y_true must lie in [0, {n_classes}); found {y_true[bad_true][0]}")
    bad_pred = (y_pred < -1) | (y_pred >= n_classes)
    if np.any(bad_pred):
        raise ValueError(f"y_pred must lie in [0, {n_classes}) or be -1; found {y_pred[bad_pred][0]}")
    keep = y_pred >= 0
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true[keep].astype(np.int64), y_pred[keep].astype(np.int64)), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Flat dict with prefixed accuracy and macro_f1 over the classes in class_names."""
    return {
        f"{prefix}accuracy": accuracy(y_true, y_pred),
        f"{prefix}macro_f1": macro_f1(y_true, y_pred, labels=list(range(len(class_names)))),
    }


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """JSON-ready per-class precision/recall/f1/support and the confusion matrix (rows = true)."""
    labels = list(range(len(class_names)))
    prf = per_class_prf(y_true, y_pred, labels)
    return {
        "class_names": list(class_names),
        "per_class": {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, (p, r, f, s) in ((class_names[i], prf[i]) for i in labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, len(class_names)).tolist(),
    }
