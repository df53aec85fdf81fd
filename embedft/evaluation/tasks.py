"""Evaluation with FAISS: one evaluator per task (retrieval, kNN classification), base vs adapted.

Exact inner-product search is always the reference; any FAISS factory string in
`eval.indexes` is reported next to it with its recall of the exact top-k and its QPS.
Every figure comes back in a flat dict with stable keys (`retrieval/recall@10`, `retrieval/r_cap@10`,
`classification/macro_f1`, `retrieval/HNSW32/recall@10`, ...). recall@k is standard recall
(|top k ∩ positives| / |positives|); r_cap@k is BEIR's R_cap@k (divided by min(|positives|, k)).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from embedft.config import EvalConfig
from embedft.data.examples import Examples, RetrievalTask, retrieval_task
from embedft.errors import EvalError

log = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    details: dict[str, Any]  # per-class report, confusion matrix, recall curve: for JSON and plots


def evaluate_retrieval(q: np.ndarray, c: np.ndarray, task: RetrievalTask, ks: tuple[int, ...],
                       indexes: tuple[str, ...] = ()) -> EvalOutput:
    """Recall@k, R_cap@k, MRR@10, nDCG@10 by exact search, and the same for each ANN index."""
    from embedft.evaluation.index import ann_report, exact_search
    from embedft.evaluation.metrics import retrieval_metrics

    if len(task.corpus) == 0 or len(task) == 0:
        raise EvalError("retrieval: the corpus or the query set is empty; the eval split needs groups with "
                        "at least two items (grouped data) or query/positive rows (pairs)")
    n_avail = len(task.corpus) - (1 if task.self_ids is not None else 0)
    want = max(max(ks), 10)  # MRR and nDCG are @10
    depth = min(want, n_avail)
    if depth < want:
        log.warning("retrieval: k=%d is larger than the corpus (%d items per query); ranks past %d are empty",
                    want, n_avail, n_avail)
    t0 = time.perf_counter()
    _, ranked = exact_search(c, q, depth, self_ids=task.self_ids)
    exact_s = time.perf_counter() - t0
    ranked = _pad(ranked, want)
    metrics = retrieval_metrics(ranked, task.positives, ks=ks, prefix="retrieval/")
    metrics["retrieval/exact/qps"] = len(q) / max(exact_s, 1e-9)
    curve = {int(k): metrics[f"retrieval/recall@{k}"] for k in ks}
    r_cap_curve = {int(k): metrics[f"retrieval/r_cap@{k}"] for k in ks}
    for factory in indexes:
        try:
            ann, ann_ranked = ann_report(c, q, depth, factory, self_ids=task.self_ids)
        except ValueError as e:  # what check_indexes cannot see before training (PQ's k-means, ...)
            raise EvalError(f"eval.indexes (--index) {factory!r}: {e}") from e
        metrics.update({f"retrieval/{k}": v for k, v in ann.items()})
        metrics.update(retrieval_metrics(_pad(ann_ranked, want), task.positives, ks=ks, prefix=f"retrieval/{factory}/"))
    return EvalOutput(metrics, {"recall_curve": curve, "r_cap_curve": r_cap_curve, "n_queries": len(task),
                                "n_corpus": len(task.corpus)})


def _pad(ranked: np.ndarray, width: int) -> np.ndarray:
    """Pad ranked ids with -1 (no result) up to `width` columns: a small corpus has no more results."""
    if ranked.shape[1] >= width:
        return ranked
    return np.concatenate([ranked, np.full((ranked.shape[0], width - ranked.shape[1]), -1, ranked.dtype)], axis=1)


def evaluate_classification(train_emb: np.ndarray, train_labels: list[str], test_emb: np.ndarray,
                            test_labels: list[str], k: int, weighted: bool = True,
                            linear_probe: bool = False) -> EvalOutput:
    """kNN over FAISS (index = train split) with a similarity-weighted vote; optional linear probe."""
    from embedft.evaluation.index import exact_search
    from embedft.evaluation.metrics import classification_metrics, classification_report, knn_predict

    if len(train_emb) == 0 or len(test_emb) == 0:
        raise EvalError("classification: the train (index) or eval (query) split is empty")
    check_knn_k(k, len(train_emb))
    classes = sorted(set(train_labels))
    class_id = {c: i for i, c in enumerate(classes)}
    unseen = sorted(set(test_labels) - set(classes))
    names = classes + unseen  # unseen labels get ids past the trainable ones: always counted as errors
    all_id = {c: i for i, c in enumerate(names)}
    y_train = np.array([class_id[x] for x in train_labels])
    y_true = np.array([all_id[x] for x in test_labels])
    scores, nn = exact_search(train_emb, test_emb, k)
    y_pred = knn_predict(y_train, scores, nn, len(classes), weighted=weighted)
    metrics = classification_metrics(y_true, y_pred, names, prefix="classification/")
    n_unseen = int(np.isin(y_true, [all_id[u] for u in unseen]).sum())
    metrics["classification/unseen_label_queries"] = float(n_unseen)
    if unseen:
        log.warning("classification: %d eval rows have %d labels never seen in training (%s); they count as errors",
                    n_unseen, len(unseen), ", ".join(unseen[:5]))
    details = {"report": classification_report(y_true, y_pred, names), "class_names": names,
               "unseen_labels": unseen}
    if linear_probe:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000).fit(train_emb, y_train)
        probe = classification_metrics(y_true, clf.predict(test_emb), names, prefix="classification/probe/")
        metrics.update(probe)
    return EvalOutput(metrics, details)


# (name, texts, is_query, amp) -> (N, D) vectors, each form of a text set embedded once per evaluation.
Embed = Callable[[str, list[str], bool, "bool | None"], np.ndarray]


def retrieval_evaluator(embed: Embed, train: Examples, eval_: Examples, cfg: EvalConfig, amp) -> EvalOutput:
    """Retrieval over the eval split: its queries against its corpus (grouped: every text against the others)."""
    task = retrieval_task(eval_)
    grouped = task.self_ids is not None  # corpus == eval texts, queries a subset of them
    c = embed("eval", eval_.texts, False, amp) if grouped else embed("corpus", task.corpus, False, amp)
    q = embed("eval", eval_.texts, True, amp)[task.self_ids] if grouped else embed("queries", task.queries, True, amp)
    return evaluate_retrieval(q, c, task, cfg.ks, cfg.indexes)


def classification_evaluator(embed: Embed, train: Examples, eval_: Examples, cfg: EvalConfig, amp) -> EvalOutput:
    """kNN classification of the eval texts by their nearest train texts (and a linear probe, if asked)."""
    tr = embed("train", train.texts, False, amp)
    te = embed("eval", eval_.texts, True, amp)
    return evaluate_classification(tr, train.labels, te, eval_.labels, cfg.knn_k, cfg.knn_weighted, cfg.linear_probe)


# eval.tasks name -> its evaluator (`tasks_for` says which fit the data). A new task: an
# evaluator here returning its metrics under "<task>/...", one line below, its fit in `tasks_for`.
EVALUATORS: dict[str, Callable[..., EvalOutput]] = {
    "retrieval": retrieval_evaluator,
    "classification": classification_evaluator,
}


def evaluate_encoder(encoder, train: Examples, eval_: Examples, cfg: EvalConfig, device=None,
                     progress: bool = False) -> EvalOutput:
    """All configured tasks for one encoder, encoded at `cfg.precision`."""
    from embedft.modeling.runtime import encode_precision

    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    memo: dict[tuple[str, bool], np.ndarray] = {}
    plain = not encoder.spec.query_template  # queries and documents embed the same way

    def embed(name: str, texts: list[str], is_query: bool, amp: bool | None) -> np.ndarray:
        # The eval texts serve as queries, corpus and kNN queries: embed each form once.
        key = (name, is_query and not plain)
        if key not in memo:
            memo[key] = encoder.encode(texts, is_query=is_query, batch_size=cfg.batch_size, progress=progress,
                                       device=device, amp=amp)
        return memo[key]

    # One weight swap (eval.precision=bf16) for the whole evaluation, not one per encoding.
    with encode_precision(encoder, cfg.precision) as amp:
        for task_name in tasks_for(cfg, train, eval_):
            t0 = time.perf_counter()
            out = EVALUATORS[task_name](embed, train, eval_, cfg, amp)
            metrics.update(out.metrics)
            details[task_name] = out.details
            metrics[f"{task_name}/seconds"] = time.perf_counter() - t0
    return EvalOutput(metrics, details)


def check_tasks(cfg: EvalConfig, train: Examples, eval_: Examples) -> None:
    """Refuse, before any model is loaded (or any training), an evaluation the splits cannot run:
    no configured task fits the data, retrieval without a query, or eval.knn_k past the train split."""
    from embedft.evaluation.index import check_factory

    for factory in cfg.indexes:  # before any model: its dimension is not needed to refuse a typo
        try:
            check_factory(factory)
        except ValueError as e:
            raise EvalError(f"eval.indexes (--index) {factory!r}: {e}") from None
    tasks = tasks_for(cfg, train, eval_)
    for task, why in dropped_tasks(cfg, train, eval_).items():
        log.warning("eval.tasks: %s is not evaluated: it %s", task, why)
    if "retrieval" in tasks and len(retrieval_task(eval_)) == 0:
        raise EvalError(f"{eval_.source}: the eval split has no retrieval query (no group with two or more items, "
                        "no query/positive row); change data.eval_fraction or data.eval, or set "
                        "-o 'eval.tasks=[classification]'")
    if "classification" in tasks:
        check_knn_k(cfg.knn_k, len(train))


def check_knn_k(k: int, n_train: int) -> None:
    """kNN classification needs at least eval.knn_k texts in its index (the train split)."""
    if k > n_train:
        raise EvalError(f"eval.knn_k={k} is larger than the {n_train} training texts in the kNN index; "
                        f"lower it (-o eval.knn_k={min(10, n_train)})")


def check_indexes(cfg: EvalConfig, dim: int, train: Examples, eval_: Examples) -> None:
    """Refuse an eval.indexes factory string faiss cannot build over the eval corpus, before anything is embedded."""
    from embedft.evaluation.index import new_index

    if not cfg.indexes:
        return
    tasks = tasks_for(cfg, train, eval_)
    if "retrieval" not in tasks:  # kNN classification searches exactly: the indexes would be built for nothing
        # A warning, not an error: a YAML may list indexes while one run restricts eval.tasks with -o.
        log.warning("eval.indexes (--index) %s not built: ANN indexes are reported for retrieval, which this "
                    "evaluation does not run (%s data, tasks %s); evaluate grouped or pairs data to see them",
                    list(cfg.indexes), eval_.shape, tasks)
        return
    n = len(retrieval_task(eval_).corpus)
    for factory in cfg.indexes:
        try:
            new_index(dim, factory, n)
        except ValueError as e:
            raise EvalError(f"eval.indexes (--index) {factory!r}: {e}") from e


def _task_problem(task: str, train: Examples, eval_: Examples) -> str | None:
    """Why `task` cannot give a meaningful figure on these splits; None when it can."""
    if task == "retrieval" and eval_.shape not in ("grouped", "pairs"):
        return f"needs grouped or pairs data ({eval_.source} is {eval_.shape} data)"
    if task == "classification":
        if train.labels is None or eval_.labels is None:
            return "needs a label column in both splits (data.label_column)"
        classes = sorted(set(train.labels))
        if len(classes) < 2:  # every prediction is that class: accuracy and macro-F1 1.0 whatever the model
            return (f"needs two or more classes, and the train split has one ({classes[0]!r} in data.label_column): "
                    "its accuracy and macro-F1 would be 1.0 whatever the model")
    return None


def dropped_tasks(cfg: EvalConfig, train: Examples, eval_: Examples) -> dict[str, str]:
    """The configured tasks these splits cannot run, each with the reason (stated in the output and the report)."""
    return {t: problem for t in cfg.tasks if (problem := _task_problem(t, train, eval_))}


def tasks_for(cfg: EvalConfig, train: Examples, eval_: Examples) -> list[str]:
    """The configured tasks that the data supports (retrieval needs groups/pairs, classification labels of two
    or more classes); none at all is an EvalError naming each task's reason."""
    dropped = dropped_tasks(cfg, train, eval_)
    out = [t for t in cfg.tasks if t not in dropped]
    if not out:
        raise EvalError(f"none of eval.tasks={list(cfg.tasks)} fits {eval_.shape} data: "
                        + "; ".join(f"{t} {why}" for t, why in dropped.items()))
    return out
