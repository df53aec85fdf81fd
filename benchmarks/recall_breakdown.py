"""Where retrieval recall@10 is lost: by the number of positives a query has, plus sample failures.

    python benchmarks/recall_breakdown.py experiments/pricerunner-matching.yaml [--adapter DIR] [--samples 10]
                                          [--compare DIR] [--metric recall|r_cap] [--split validation|test] [-o K=V]

Embeds the experiment's validation split (`--split validation`, the default: the products training carves out of
the training data, `train.val_fraction` and `data.split_seed`, as the runs' per-epoch validation and
benchmarks/compare_adapters.py carve them; `-o` overrides must match the runs') or its eval split (`--split test`,
a record only: what it shows must not choose a setting), in document form as `embedft eval` does for grouped data,
searches exactly, and prints recall@10 per bucket of positives with each bucket's share of
the queries and of the lost recall; then, for grouped data, the lost recall by the kind of miss
(`miss_kind`: a wrong top hit with the query's very title, a title of three words or fewer, wrong
hits all of the query's label, a wrong hit of another label); then a few queries with recall < 0.5
and their top hits (+ = a positive). Without --adapter it reports the base model. `--compare DIR`
(an adapter folder, or `base`) adds that model's recall@10 per bucket and how many of the bucket's
queries changed recall between the two. `--metric r_cap` breaks down R_cap@10 (hits /
min(|positives|, 10), what embedft called recall@10 before issue 29) instead of standard recall@10
(hits / |positives|).
"""

from __future__ import annotations

import argparse

import numpy as np

BUCKETS = ((1, 1), (2, 3), (4, 9), (10, 10**9))
KINDS = ("identical title", "short title", "same label", "other label")


def miss_kind(query: str, wrong: list[int], corpus: list[str], labels: list | None, own_label) -> str:
    """Why a query lost recall, by the first that holds: a wrong top hit has the query's very title (no encoder
    can rank it below the positives); the title has three words or fewer (too generic to tell products apart);
    every wrong hit has the query's label (a near twin: another product of its category); else a wrong hit of
    another label. Without labels, the last two are one kind, "other label"."""
    if any(corpus[j] == query for j in wrong):
        return "identical title"
    if len(query.split()) <= 3:
        return "short title"
    if labels is not None and all(labels[j] == own_label for j in wrong):
        return "same label"
    return "other label"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--adapter", help="adapter folder (default: the base model)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--compare", help="a second adapter folder, or 'base', to compare per bucket")
    ap.add_argument("--metric", choices=("recall", "r_cap"), default="recall",
                    help="standard recall@10 (default) or R_cap@10 (the figures in docs/benchmarks.md before issue 29)")
    ap.add_argument("--split", choices=("validation", "test"), default="validation",
                    help="the validation products carved from training (default), or the eval split (a record only)")
    ap.add_argument("-o", "--override", action="append", default=[], help="config override, as embedft train -o")
    args = ap.parse_args()

    from embedft.config import load_config
    from embedft.data.examples import carve_validation, load_splits, retrieval_task
    from embedft.evaluation.index import exact_search
    from embedft.evaluation.metrics import r_cap_at_k, recall_at_k
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter

    cfg = load_config(args.experiment, args.override)
    train_ex, eval_ex, _ = load_splits(cfg.data)
    if args.split == "validation":
        _, eval_ex = carve_validation(train_ex, cfg.train.val_fraction, cfg.data.split_seed)
        if eval_ex is None:
            raise SystemExit(f"{args.experiment}: train.val_fraction={cfg.train.val_fraction} carves no validation "
                             "split; pass -o train.val_fraction=0.1 (as the runs trained), or --split test")
    task = retrieval_task(eval_ex)
    metric = recall_at_k if args.metric == "recall" else r_cap_at_k
    name = f"{args.metric}@10"

    def per_query_recall(adapter: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(ranked top-10 ids, the metric @10 of each query) of the base model with `adapter`."""
        encoder = load_encoder(cfg.model)
        if adapter:
            load_adapter(encoder, adapter)
        corpus = encoder.encode_ids(encoder.tokenize(task.corpus, is_query=False))
        _, ranked = exact_search(corpus, corpus[task.self_ids], 10, self_ids=task.self_ids)
        return ranked, np.array([metric(ranked[i:i + 1], [p], 10) for i, p in enumerate(task.positives)])

    ranked, per_query = per_query_recall(args.adapter)
    other = None
    if args.compare:
        _, other = per_query_recall(None if args.compare == "base" else args.compare)
    lost = (1 - per_query).sum()
    n_pos = np.array([len(p) for p in task.positives])
    print(f"{args.adapter or cfg.model.name}: {name} {per_query.mean():.4f} over {len(per_query)} queries "
          f"({args.split} split)")
    if other is not None:
        print(f"{args.compare}: {name} {other.mean():.4f}")
    print(f"positives  queries  share  {name:>9}  share of lost recall"
          + (f"  compared {name:>9}  queries changed" if other is not None else ""))
    for lo, hi in BUCKETS:
        m = (n_pos >= lo) & (n_pos <= hi)
        if not m.any():
            continue
        name = f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f">={lo}")
        line = f"{name:>9}  {m.sum():7d}  {m.mean():5.1%}  {per_query[m].mean():9.4f}  {(1 - per_query[m]).sum() / lost:5.1%}"
        if other is not None:
            line += f"  {other[m].mean():18.4f}  {(other[m] != per_query[m]).sum():15d}"
        print(line)
    if task.self_ids is not None:  # grouped data: queries are corpus texts, labelled where the data has labels
        labels = eval_ex.labels
        kinds = {}
        for i in np.flatnonzero(per_query < 1):
            pos = set(task.positives[i].tolist())
            q = task.self_ids[i]
            wrong = [j for j in ranked[i].tolist() if j not in pos and j >= 0]
            kind = miss_kind(task.corpus[q], wrong, task.corpus, labels, None if labels is None else labels[q])
            kinds.setdefault(kind, []).append(i)
        print("kind of miss      queries  share of lost recall")
        for kind in KINDS:
            got = kinds.get(kind, [])
            print(f"{kind:16s}  {len(got):7d}  {(1 - per_query[got]).sum() / lost if lost else 0:5.1%}")
    bad = np.flatnonzero(per_query < 0.5)
    rng = np.random.default_rng(0)
    for i in rng.choice(bad, min(args.samples, len(bad)), replace=False):
        pos = set(task.positives[i].tolist())
        print(f"\nquery: {task.corpus[task.self_ids[i]]}\n  positives: {[task.corpus[j] for j in task.positives[i][:3]]}")
        print("  top 3:", [("+" if j in pos else "-") + task.corpus[j] for j in ranked[i][:3]])


if __name__ == "__main__":
    main()
