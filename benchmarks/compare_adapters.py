"""Adapters (or an adapter and the base model) on one validation split, query by query, with a paired interval.

    python benchmarks/compare_adapters.py experiments/pricerunner-matching.yaml RUN_A/adapter RUN_B/adapter ... \
        -o train.val_fraction=0.25 -o train.val_max_queries=100000

A screen's validation figure moves by a few thousandths between two runs of one setting, and the per-epoch
validation gives one figure without an interval (and, where queries are encoded apart from the corpus, looks at
`train.val_max_queries` of them, 1,000 by default). This measures each model on the same queries of the
validation split carved as training carves it (`train.val_fraction`, `data.split_seed`; the
overrides must match the ones the runs trained with, or their validation products were trained on). For each B
it prints recall@10, R_cap@10, R_cap@1 and MRR@10 of A and B (the top of the ranking as well as its first ten), the
mean per-query difference B - A, and a 95% bootstrap interval of that difference over queries (resampled in pairs,
so what both models share cancels). Grouped data with a
label column (categories) also gets the evaluation's kNN classification on the validation texts, against at
most `train.val_max_index` training texts: macro-F1 per model, and accuracy with its paired interval. `base` is
the untuned model. Grouped and pairs data (retrieval validation) only. The test split is never scored.
"""

from __future__ import annotations

import argparse
import json


def per_query(ranked, positives, k: int):
    """(recall@k, R_cap@k, R_cap@1, MRR@k) per query, each by the evaluation's own metric function on that
    query's row."""
    import numpy as np

    from embedft.evaluation.metrics import mrr_at_k, r_cap_at_k, recall_at_k

    metrics = ((recall_at_k, k), (r_cap_at_k, k), (r_cap_at_k, 1), (mrr_at_k, k))
    return tuple(np.array([metric(ranked[i:i + 1], [p], at) for i, p in enumerate(positives)])
                 for metric, at in metrics)


def knn_correct(encoder, fit, val, queries, k: int, max_index: int, seed: int, device):
    """Per validation text, whether kNN over the labels (categories) of at most `max_index` training texts
    classifies it right, and the macro-F1: the evaluation's classification task on the validation split.
    `queries` are the validation texts' query vectors, (len(val), D)."""
    import numpy as np

    from embedft.evaluation.index import exact_search
    from embedft.evaluation.metrics import knn_predict, macro_f1

    classes = sorted(set(fit.labels) | set(val.labels))
    cid = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    idx = np.arange(len(fit)) if len(fit) <= max_index else np.sort(rng.choice(len(fit), max_index, replace=False))
    index = encoder.encode_ids(encoder.tokenize([fit.texts[i] for i in idx.tolist()]), device=device)
    scores, nn = exact_search(index, queries, k)
    index_labels = np.array([cid[fit.labels[i]] for i in idx.tolist()])
    pred = knn_predict(index_labels, scores, nn, len(classes))
    truth = np.array([cid[c] for c in val.labels])
    return (pred == truth).astype(np.float64), macro_f1(truth, pred, labels=list(range(len(classes))))


def paired_interval(diff, boot: int, seed: int) -> tuple[float, float]:
    """95% bootstrap interval of mean(diff), resampling queries."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(boot)])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="the experiment the runs trained (or a run's config.yaml)")
    ap.add_argument("a", help="adapter folder A (the reference), or base")
    ap.add_argument("b", nargs="+", help="adapter folders B, each compared with A, or base")
    ap.add_argument("-o", "--override", action="append", default=[], help="config override, as embedft train -o")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()

    import torch

    from embedft.config import load_config
    from embedft.evaluation.index import exact_search
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter
    from embedft.recipes.common import prepare_data
    from embedft.training.validation import query_vectors, val_set_for

    cfg = load_config(args.experiment, args.override)
    data = prepare_data(cfg)
    device = torch.device("cpu")
    val = None

    def measure(path: str) -> tuple:
        nonlocal val
        encoder = load_encoder(cfg.model)
        if path != "base":
            encoder = load_adapter(encoder, path)
        encoder.eval()
        if val is None:
            val = val_set_for(encoder, data.fit, data.val, cfg)
            if val is None or val.positives is None:
                raise SystemExit(f"{args.experiment}: no retrieval validation split (labeled data, or "
                                 "train.val_fraction=0); this compares retrieval validation only")
        c = encoder.encode_ids(val.corpus_ids, device=device)
        q = query_vectors(encoder, val, c, device)
        _, ranked = exact_search(c, q, args.k, self_ids=val.self_ids)
        got = per_query(ranked, val.positives, args.k)
        if data.val.labels is not None:  # grouped data with categories: the kNN classification task as well
            # The corpus opens with the validation texts in order (training texts follow: train.val_distractors);
            # without a query form those rows are their query vectors too.
            kq = c[:len(data.val)] if not encoder.spec.query_template else encoder.encode_ids(
                encoder.tokenize(data.val.texts, is_query=True), device=device)
            got += knn_correct(encoder, data.fit, data.val, kq, cfg.eval.knn_k, cfg.train.val_max_index,
                               cfg.train.seed, device)
        return got

    ref = measure(args.a)
    names = (f"recall@{args.k}", f"r_cap@{args.k}", "r_cap@1", f"mrr@{args.k}", "knn accuracy")
    names = names[:len(names) if len(ref) > 4 else 4]
    for b in args.b:
        other = measure(b)
        out = {"experiment": args.experiment, "overrides": args.override, "a": args.a, "b": b,
               "queries": len(val.query_ids), "corpus": len(val.corpus_ids)}
        print(f"B = {b} against A = {args.a}:", flush=True)
        if len(ref) > 4:
            out["knn macro_f1"] = {"A": round(float(ref[5]), 4), "B": round(float(other[5]), 4)}
            print(f"  knn macro_f1: A {ref[5]:.4f}  B {other[5]:.4f}", flush=True)
        for i, name in enumerate(names):
            x, y = ref[i], other[i]
            lo, hi = paired_interval(y - x, args.boot, cfg.train.seed)
            out[name] = {"A": round(float(x.mean()), 4), "B": round(float(y.mean()), 4),
                         "B-A": round(float((y - x).mean()), 4), "95%": [round(lo, 4), round(hi, 4)],
                         "B better / worse": [int((y > x).sum()), int((y < x).sum())]}
            print(f"  {name}: A {x.mean():.4f}  B {y.mean():.4f}  B-A {(y - x).mean():+.4f}  "
                  f"95% [{lo:+.4f}, {hi:+.4f}]", flush=True)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
