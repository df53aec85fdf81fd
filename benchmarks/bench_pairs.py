"""Retrieval (pairs and grouped data): the base model vs the adapted one, side by side in each run, on
PriceRunner product search, catalog matching and offer matching, over several seeds.

    python benchmarks/bench_pairs.py [--seeds 0,1] [--train-rows 8000] [--task search|catalog|matching]
        [--setting NAME:key=value,key=value ...] [--no-defaults] [--model minilm] [--threads N] [--out DIR]

The task: a product's name (PriceRunner's cluster_label, "Bosch KIV32X23GB Integrated") is the query, and the
titles its shops list it under ("bosch kiv32x23gb serie 2 50/50 integrated fridge freezer white") are the
documents it should find, as a shop's search log pairs a query with the items clicked for it. Split by product as
the dataset README's benchmark split (test = cluster_id % 5 == 0): every test product's name searches all the test
titles (each title once); the training file holds --train-rows (name, title) rows drawn by the seed from the other
products, less any name or title that is also on the test side (a number above the rows there are takes them all:
about 28,000).

`--task catalog` turns the rows round: a shop's title is the query and its product's name the document, as a shop
feed is matched to a catalog (each test title searches the 2,614 test names; the same rows, so the same training
data). A second query-document task with another corpus (short names) and one positive per query, for settings
that must hold on more than one.

`--task matching` is grouped data (`shape: grouped`, text and product): offers of the training products, drawn
product by product by the seed until --train-rows offers, each title once per product; every test offer queries
the other test offers (its positives: its product's). The PriceRunner matching experiment's task with no settings,
on a third of its training data, for what grouped data gets by default.

Each (setting, seed) is one `embedft train` of a `shape: pairs` (matching: `grouped`), `split: given` experiment
with no training settings but the setting's `-o` overrides (`recipes.train.run_train`, tracking off); its evaluation
puts the base model's retrieval figures next to the adapted model's on the test queries. Nothing is chosen on them:
the run keeps the epoch with the best validation metric (recall@10, or what `train.select_metric` names) on a split
carved out of its training file (by query; matching: by product), and the table's `val recall@10` and `val mrr@10`
(the kept epoch's, mean over seeds) are what a setting is chosen on.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_labeled import _write, argument_parser, load_offers, parse_settings, report  # noqa: E402

METRICS = ("recall@1", "recall@10", "r_cap@10", "mrr@10", "ndcg@10")
VAL_METRICS = ("recall@10", "mrr@10")  # the kept epoch's, on the validation split


def make_search(offers, out: Path, seed: int, n_train: int, task: str = "search") -> tuple[Path, Path, int, int]:
    """(train.csv, test.csv, training rows, test queries): (query, positive) rows, a product's name and one of its
    titles (`catalog`: a title and its product's name), each row once; test = cluster_id % 5 == 0, and a name or
    title of the test side never in training."""
    rows = {side: sorted({(name, title) for title, c, _, name in offers if (c % 5 == 0) == (side == "test")})
            for side in ("train", "test")}
    test_texts = {t for row in rows["test"] for t in row}
    train = [r for r in rows["train"] if r[0] not in test_texts and r[1] not in test_texts]
    train = [train[i] for i in sorted(np.random.default_rng(seed).permutation(len(train))[:n_train])]
    if task == "catalog":
        train, rows["test"] = [(t, n) for n, t in train], sorted((t, n) for n, t in rows["test"])
    d = out / f"{task}-s{seed}"
    for side, data in (("train", train), ("test", rows["test"])):
        _write(d / f"{side}.csv", data, ("query", "positive"))
    return d / "train.csv", d / "test.csv", len(train), len({q for q, _ in rows["test"]})


def make_matching(offers, out: Path, seed: int, n_train: int) -> tuple[Path, Path, int, int]:
    """(train.csv, test.csv, training offers, test queries): (text, product) rows, each title once per product; the
    training products (drawn by the seed until n_train offers, those with two titles or more) less any title of the
    test side; test = every product with cluster_id % 5 == 0."""
    products: dict[str, dict[int, dict[str, None]]] = {"train": {}, "test": {}}
    for title, c, _, _ in offers:
        products["test" if c % 5 == 0 else "train"].setdefault(c, {})[title] = None
    test_titles = {t for titles in products["test"].values() for t in titles}
    train_products = {c: [t for t in titles if t not in test_titles] for c, titles in products["train"].items()}
    train_products = {c: titles for c, titles in sorted(train_products.items()) if len(titles) >= 2}
    ids = list(train_products)
    train: list[tuple[str, int]] = []
    for i in np.random.default_rng(seed).permutation(len(ids)):
        if len(train) >= n_train:
            break
        train += [(t, ids[i]) for t in train_products[ids[i]]]
    test = [(t, c) for c, titles in sorted(products["test"].items()) for t in titles]
    d = out / f"matching-s{seed}"
    for side, data in (("train", sorted(train, key=lambda r: r[1])), ("test", test)):
        _write(d / f"{side}.csv", data, ("text", "product"))
    queries = sum(len(titles) for titles in products["test"].values() if len(titles) >= 2)
    return d / "train.csv", d / "test.csv", len(train), queries


def experiment(train: Path, test: Path, model: str, seed: int, out: Path, overrides: tuple[str, ...],
               threads: int | None, task: str = "search"):
    """The `shape: pairs` experiment (`shape: grouped` for matching): defaults, plus the setting's overrides."""
    from embedft.config import apply_overrides, config_from_dict

    columns = ({"shape": "grouped", "text_column": "text", "group_column": "product",
                # as the PriceRunner experiment: single-offer products and titles of two products stay in the corpus
                "on_singleton": "warn", "on_duplicate": "warn", "on_overlap": "warn"} if task == "matching" else
               {"shape": "pairs", "query_column": "query", "positive_column": "positive"})
    values = {"name": f"{task}-s{seed}",
              "data": {"train": str(train), "eval": str(test), "split": "given", **columns},
              "model": {"name": model},
              "train": {"seed": seed, "output_dir": str(out), "threads": threads},
              "eval": {"tasks": ["retrieval"]},
              "tracking": {"enabled": False}}
    return config_from_dict(apply_overrides(values, list(overrides)))


def run_one(train: Path, test: Path, setting: str, overrides: tuple[str, ...], seed: int, args) -> dict:
    from embedft.recipes.train import run_train

    run_dir = Path(args.out) / "runs" / f"{args.task}-{setting}-s{seed}"
    cfg = experiment(train, test, args.model, seed, run_dir, overrides, args.threads, args.task)
    t0 = time.perf_counter()
    summary = run_train(cfg, progress=False)
    m = summary["metrics"]
    row = {"setting": setting, "seed": seed, "steps": summary["steps"], "epochs": summary.get("epochs_done"),
           "best_epoch": summary.get("best_epoch"), "wall_s": round(time.perf_counter() - t0, 1),
           "queries": m.get("adapted/retrieval/n_queries"),
           **{f"val/{k}": m.get(f"train/best_val/{k}") for k in VAL_METRICS}}
    for k in METRICS:
        row[f"base/{k}"], row[f"adapted/{k}"] = m.get(f"base/retrieval/{k}"), m.get(f"adapted/retrieval/{k}")
    return row


def _mean_or_dash(values: list[float | None]) -> str:
    return "-" if not values or None in values else f"{statistics.fmean(values):.4f}"


def table(rows: list[dict]) -> str:
    """Per setting: mean over seeds of base and adapted test figures, and the kept epoch's validation recall@10
    and MRR@10."""
    cols = " | ".join(f"base {k} | adapted {k}" for k in METRICS)
    lines = [f"| setting | seeds | {cols} | {' | '.join(f'val {k}' for k in VAL_METRICS)} | steps | best/epochs | "
             "wall s |", "|" + "---|" * (2 * len(METRICS) + 5 + len(VAL_METRICS))]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == setting]
        mean = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        figures = " | ".join(f"{mean('base/' + k):.4f} | {mean('adapted/' + k):.4f}" for k in METRICS)
        val = " | ".join(_mean_or_dash([r.get(f"val/{k}") for r in rs]) for k in VAL_METRICS)
        lines.append(f"| {setting} | {len(rs)} | {figures} | {val} | {mean('steps'):.0f} | "
                     f"{', '.join(str(r['best_epoch']) + '/' + str(r['epochs']) for r in rs)} | {mean('wall_s'):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__.splitlines()[0], "/tmp/bench-pairs")
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--task", choices=("search", "catalog", "matching"), default="search",
                   help="search: a product's name finds its titles; catalog: a title finds its product's name; "
                        "matching (grouped data): an offer finds its product's other offers")
    args = p.parse_args(argv)
    settings = parse_settings(args.setting, defaults=not args.no_defaults, before=None)
    if not settings:
        p.error("nothing to run: --no-defaults needs a --setting")
    offers = load_offers(args.data)
    if offers is None:
        return 2
    out = Path(args.out)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        train, test, n_train, n_queries = (
            make_matching(offers, out / "data", seed, args.train_rows) if args.task == "matching"
            else make_search(offers, out / "data", seed, args.train_rows, args.task))
        print(f"seed {seed}: {n_train} training rows, {n_queries} test queries", flush=True)
        for setting, overrides in settings.items():
            rows.append(run_one(train, test, setting, overrides, seed, args))
            print(json.dumps(rows[-1]), flush=True)
    report(rows, table(rows), out, f"task {args.task}, model {args.model}, seeds {args.seeds}, {args.train_rows} "
           "training rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
