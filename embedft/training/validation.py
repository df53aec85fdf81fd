"""Per-epoch validation on a split carved out of the training data (never the eval split): kNN macro-F1 and
accuracy for labeled data; recall@10, R_cap@10 (the evaluation's capped figure), MRR@10 and nDCG@10 for grouped
and pairs data; and the loss on a few fixed batches. Model selection and early stopping follow the one
train.select_metric names (`selected_metric`: by default macro-F1, or recall@10)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from embedft.config import GROUP_SAMPLINGS, ExperimentConfig, resolve_select_metric
from embedft.data.batches import PairSource, build_pair_source, epoch_batches
from embedft.data.examples import Examples, RetrievalTask, retrieval_task
from embedft.errors import DataError
from embedft.modeling.encoder import Encoder
from embedft.modeling.runtime import lora_input_casts, uses_amp
from embedft.training.losses import BatchLoss
from embedft.training.step import embed
from embedft.training.tokens import TokenCache, batch_sequences

log = logging.getLogger(__name__)


@dataclass
class ValSet:
    """Per-epoch validation: retrieval queries/corpus (token ids), or kNN queries against an index of
    training texts (labeled data), and a few fixed loss batches."""

    query_ids: list[list[int]]
    corpus_ids: list[list[int]]  # retrieval: the corpus; kNN: the index (training texts)
    positives: list[np.ndarray] | None  # retrieval, per query: corpus indices
    self_ids: np.ndarray | None  # per query: its own corpus index (excluded), or None
    loss_source: PairSource | None = None
    loss_batches: int = 4
    query_labels: np.ndarray | None = None  # kNN: (Q,) class ids of the queries
    corpus_labels: np.ndarray | None = None  # kNN: (C,) class ids of the index texts
    n_classes: int = 0
    knn_k: int = 10
    # Retrieval on grouped data without a query instruction: each query is a corpus text in the same form, so its
    # vector is its own corpus row (self_ids) and no query is encoded.
    queries_in_corpus: bool = False


def selected_metric(val: ValSet, select_metric: str = "auto") -> str:
    """The key of `validate`'s output that model selection follows (higher is better): train.select_metric, where
    auto means macro-F1 for labeled data (a kNN validation) and recall@10 for grouped and pairs data."""
    return resolve_select_metric(select_metric, labeled=val.query_labels is not None)


@torch.no_grad()
def validate(encoder: Encoder, val: ValSet, text_keys_cache: tuple[PairSource, TokenCache] | None,
             loss_fn: BatchLoss, batch_size: int, device: torch.device, seed: int, k: int = 10,
             sampling: str = "random", group_size: int = 4) -> dict[str, float]:
    """Validation recall@k (standard: over all positives), R_cap@k (over min(positives, k), the figure the
    evaluation's `retrieval/r_cap@k` reports), MRR@k and nDCG@k by exact search, or kNN macro-F1 and accuracy for
    labeled data; and validation loss on fixed batches (drawn as the training batches are, random
    groups standing in for similar ones)."""
    from embedft.evaluation.index import exact_search
    from embedft.evaluation.metrics import (classification_metrics, knn_predict, mrr_at_k, ndcg_at_k, r_cap_at_k,
                                            recall_at_k)

    c = encoder.encode_ids(val.corpus_ids, device=device)
    q = query_vectors(encoder, val, c, device)
    if val.query_labels is not None:
        kk = min(val.knn_k, len(val.corpus_ids))
        scores, nn = exact_search(c, q, kk)
        pred = knn_predict(val.corpus_labels, scores, nn, val.n_classes)
        out = classification_metrics(val.query_labels, pred, range(val.n_classes), prefix="val/")
    else:
        kk = min(k, len(val.corpus_ids) - (1 if val.self_ids is not None else 0))
        _, ranked = exact_search(c, q, kk, self_ids=val.self_ids)
        out = {f"val/recall@{k}": recall_at_k(ranked, val.positives, kk),
               f"val/r_cap@{k}": r_cap_at_k(ranked, val.positives, kk),
               f"val/mrr@{k}": mrr_at_k(ranked, val.positives, kk),
               f"val/ndcg@{k}": ndcg_at_k(ranked, val.positives, kk)}
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
                losses.append(float(loss_fn(emb, batch, gather, src.keys)))
        encoder.train()
        if losses:
            out["val/loss"] = float(np.mean(losses))
    return out


def val_set_for(encoder, fit_ex: Examples, val_ex: Examples | None, cfg: ExperimentConfig) -> ValSet | None:
    """`build_val_set` with the experiment's settings (train.val_*, eval.knn_k, train.seed)."""
    t = cfg.train
    return build_val_set(encoder, fit_ex, val_ex, t.val_max_queries, t.val_max_index, cfg.eval.knn_k, t.seed,
                         distractors=t.val_distractors)


def build_val_set(encoder, fit_ex: Examples, val_ex: Examples | None, max_queries: int, max_index: int,
                  knn_k: int, seed: int, distractors: int = 0) -> ValSet | None:
    """Per-epoch validation from the validation split carved out of the training data
    (`data.examples.carve_validation`); None without one.

    Labeled data: at most `max_queries` validation texts classified by kNN (`knn_k` neighbours,
    similarity-weighted, as the final evaluation votes) against at most `max_index` of the texts
    trained on. Grouped and pairs data: a retrieval task within the validation split, its corpus joined by
    at most `distractors` documents of the training split (`with_distractors`).
    """
    if val_ex is None:
        return None
    try:
        loss_src = build_pair_source(val_ex)
    except DataError:
        loss_src = None
    if val_ex.shape == "labeled":
        rng = np.random.default_rng(seed)
        q = _cap(len(val_ex), max_queries, rng)
        idx = _cap(len(fit_ex), max_index, rng)
        classes = sorted(set(fit_ex.labels))
        cid = {c: i for i, c in enumerate(classes)}
        # A validation label that no training text has cannot be predicted: it counts as an error.
        qlab = np.array([cid.get(val_ex.labels[i], len(classes)) for i in q.tolist()])
        return ValSet(encoder.tokenize([val_ex.texts[i] for i in q.tolist()], is_query=True),
                      encoder.tokenize([fit_ex.texts[i] for i in idx.tolist()]), None, None, loss_source=loss_src,
                      query_labels=qlab, corpus_labels=np.array([cid[fit_ex.labels[i]] for i in idx.tolist()]),
                      n_classes=len(classes) + int((qlab == len(classes)).any()), knn_k=knn_k)
    # Grouped data without a query instruction: a query is a validation text whose vector the corpus already has,
    # so every query is scored (a search, no encoding) and `max_queries`, which bounds the encoding, does not cap
    # them: 1,000 of PriceRunner's 2,388 validation queries left a recall@10 a few thousandths of noise.
    same_form = val_ex.shape == "grouped" and not encoder.spec.query_template
    task = retrieval_task(val_ex, max_queries=None if same_form else max_queries, seed=seed)
    if len(task) == 0:
        raise DataError(f"{val_ex.source}: the validation split carved out of the training data (train.val_fraction) "
                        "has no retrieval query (no group with two texts, no query/positive row); raise "
                        "train.val_fraction, or set -o train.val_fraction=0 -o train.select_best=false "
                        "-o train.patience=null")
    task = with_distractors(task, fit_ex, distractors, seed)
    corpus = encoder.tokenize(task.corpus)
    if same_form:
        return ValSet([corpus[i] for i in task.self_ids.tolist()], corpus, task.positives, task.self_ids,
                      loss_source=loss_src, queries_in_corpus=True)
    return ValSet(encoder.tokenize(task.queries, is_query=True), corpus, task.positives, task.self_ids,
                  loss_source=loss_src)


def with_distractors(task: RetrievalTask, fit_ex: Examples, n: int, seed: int) -> RetrievalTask:
    """The validation task with at most n documents of the training split (texts of other groups; pairs' positives
    and negatives), drawn by the seed, after its corpus. The validation split's own documents are a small corpus
    (a tenth of the data's), where recall@10 sits near 1 and ranks settings unlike the evaluation's full corpus
    does; these make it search a corpus nearer that size. A text already in the corpus is not added again."""
    if n <= 0:
        return task
    have = set(task.corpus)
    extra = [t for t in dict.fromkeys(fit_ex.documents()) if t.strip() and t not in have]
    if len(extra) > n:
        extra = [extra[i] for i in np.sort(np.random.default_rng(seed).choice(len(extra), size=n, replace=False))]
    log.info("validation: %d queries against %d documents (%d of them from the training split: "
             "train.val_distractors)", len(task), len(task.corpus) + len(extra), len(extra))
    return RetrievalTask(task.queries, task.corpus + extra, task.positives, task.self_ids)


def query_vectors(encoder: Encoder, val: ValSet, corpus: np.ndarray, device: torch.device) -> np.ndarray:
    """(Q, D) the validation queries' vectors: rows of the corpus's (C, D) vectors when the queries are corpus
    texts in the same form (`ValSet.queries_in_corpus`: their own rows, `self_ids`), else encoded."""
    if val.queries_in_corpus:
        return corpus[val.self_ids]
    return encoder.encode_ids(val.query_ids, device=device)


def _cap(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most `cap` of n items, drawn at random."""
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))
