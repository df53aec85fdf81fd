"""Labeled data (classification): the base model vs the adapted one, side by side in each run,
on proxies built from PriceRunner, over several seeds.

    python benchmarks/bench_labeled.py [--proxies categories,products,fewshot,brands] [--seeds 0,1]
        [--setting NAME:key=value,key=value ...] [--model minilm] [--threads N] [--out DIR]

Each (proxy, setting, seed) is one `embedft train` of a `shape: labeled`, `split: given`
experiment (`recipes.train.run_train`, tracking off), whose evaluation puts the base model's kNN
accuracy / macro-F1 and linear probe next to the adapted model's. Nothing is chosen on the test
files: the training run selects its epoch on a validation split carved out of its training file, and the
table's `val F1` (that split's kNN macro-F1 at the kept epoch, mean over seeds) is what a setting is chosen on;
the test columns are records.

Proxies (written as CSVs under --out, never into the repo; the seed draws the subsample):

- `categories`: PriceRunner's 10 categories, split by product as its README's benchmark split
  (test = cluster_id % 5 == 0); --cat-train training offers drawn from the train side, a fixed
  --cat-test test offers (the same for every seed).
- `products`: many classes of short texts, as intents are: --classes products with at least
  --min-offers offers (drawn by the seed), each product a class; per product, --test-share of its
  offers are test texts, the rest training texts.
- `fewshot`: `products` with --shots training texts per class (same classes and test texts).
- `brands`: a proxy whose base model is already strong, with many classes: the maker within the
  category ("samsung / Mobile Phones", the first word of the product's name and its category),
  the --brand-classes largest with >= 10 test offers, product-disjoint as `categories`; at most
  --brand-cap training offers per class, drawn by the seed. With the defaults: 77 classes, about
  9,400 training and 4,600 test offers, base kNN accuracy 0.92.

A setting is a name and `-o` overrides (`--setting lr1e-3:train.lr=1e-3,train.epochs=5`);
`defaults` (no overrides) is run too, unless --no-defaults (training on a CPU is deterministic for a seed, so
its rows from an earlier invocation of the same training code stand). Without --setting: `defaults` and `before` (the
training settings labeled data had before issue 29: random pairs, lr 2e-4, one epoch, no
validation split).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRICERUNNER = REPO.parent / "shared" / "datasets" / "pricerunner" / "pricerunner_aggregate.csv"
# The training settings a `shape: labeled` experiment got before issue 29 (for the record).
BEFORE = ("train.batch_sampling=random", "train.lr=2e-4", "train.epochs=1", "train.val_fraction=0",
          "train.select_best=false", "train.patience=null", "loss.temperature=0.05")
METRICS = ("accuracy", "macro_f1", "probe/accuracy", "probe/macro_f1")


@dataclasses.dataclass(frozen=True)
class Proxy:
    name: str
    train: Path
    test: Path
    n_classes: int
    n_train: int
    n_test: int


def read_offers(path: Path) -> list[tuple[str, int, str, str]]:
    """(title, cluster_id, category, product name) per PriceRunner offer."""
    with open(path, newline="", encoding="utf-8") as f:
        return [(r[1], int(r[3]), r[6], r[4]) for r in csv.reader(f)]


def _write(path: Path, rows: list[tuple], header: tuple[str, ...] = ("text", "label")) -> int:
    """A CSV of `header` and `rows` at `path` (its folder made); the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return len(rows)


def _dedupe(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> tuple[list, list]:
    """Each title once, a title in the test set never in training (PriceRunner repeats titles across merchants)."""
    test_seen: dict[str, tuple[str, str]] = {}
    for t, lab in test:
        test_seen.setdefault(t, (t, lab))
    train_seen: dict[str, tuple[str, str]] = {}
    for t, lab in train:
        if t not in test_seen:
            train_seen.setdefault(t, (t, lab))
    return list(train_seen.values()), list(test_seen.values())


def _product_split(offers, label) -> tuple[list, list]:
    """(title, label(offer)) per offer, split by product as the dataset README's benchmark split
    (cluster_id % 5 == 0 is test), each title once (`_dedupe`)."""
    train = [(offer[0], label(offer)) for offer in offers if offer[1] % 5 != 0]
    test = [(offer[0], label(offer)) for offer in offers if offer[1] % 5 == 0]
    return _dedupe(train, test)


def make_categories(offers, out: Path, seed: int, n_train: int, n_test: int) -> Proxy:
    """PriceRunner's categories, product-disjoint (cluster_id % 5 == 0 is test)."""
    train, test = _product_split(offers, lambda offer: offer[2])
    test = [test[i] for i in sorted(np.random.default_rng(0).choice(len(test), min(n_test, len(test)), replace=False))]
    train = [train[i] for i in sorted(np.random.default_rng(seed).choice(len(train), min(n_train, len(train)),
                                                                          replace=False))]
    d = out / f"categories-s{seed}"
    return Proxy("categories", d / "train.csv", d / "test.csv", len({lab for _, lab in train}),
                 _write(d / "train.csv", train), _write(d / "test.csv", test))


def make_products(offers, out: Path, seed: int, n_classes: int, min_offers: int, test_share: float,
                  shots: int | None = None) -> Proxy:
    """Products as classes: `n_classes` products with >= `min_offers` distinct titles; per product a
    `test_share` of its titles to test, the rest (or `shots` of them) to training."""
    titles: dict[int, list[str]] = {}
    for t, c, _, _ in offers:
        if t not in titles.setdefault(c, []):
            titles[c].append(t)
    owner: dict[str, set[int]] = {}
    for c, ts in titles.items():
        for t in ts:
            owner.setdefault(t, set()).add(c)
    # A title shared by two products is ambiguous as a class example: left out.
    titles = {c: [t for t in ts if len(owner[t]) == 1] for c, ts in titles.items()}
    eligible = sorted(c for c, ts in titles.items() if len(ts) >= min_offers)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(eligible, size=min(n_classes, len(eligible)), replace=False).tolist())
    train, test = [], []
    for c in chosen:
        ts = [titles[c][i] for i in rng.permutation(len(titles[c]))]
        n_test = max(1, int(round(test_share * len(ts))))
        test += [(t, f"p{c}") for t in ts[:n_test]]
        rest = ts[n_test:]
        train += [(t, f"p{c}") for t in (rest[:shots] if shots else rest)]
    name = f"fewshot{shots}" if shots else "products"
    d = out / f"{name}-s{seed}"
    return Proxy(name, d / "train.csv", d / "test.csv", len(chosen), _write(d / "train.csv", train),
                 _write(d / "test.csv", test))


def make_brands(offers, out: Path, seed: int, n_classes: int, cap: int) -> Proxy:
    """Maker within category as classes ("samsung / Mobile Phones"), product-disjoint (cluster_id % 5 == 0
    is test): the `n_classes` classes with the most training offers among those with >= 10 test offers,
    at most `cap` training offers each (drawn by the seed); every test offer of those classes."""
    train, test = _product_split(offers, lambda offer: f"{offer[3].split()[0].lower()} / {offer[2]}")
    n_test = collections.Counter(lab for _, lab in test)
    by_label: dict[str, list[str]] = {}
    for t, lab in train:
        by_label.setdefault(lab, []).append(t)
    ranked = sorted((lab for lab in by_label if n_test[lab] >= 10), key=lambda lab: (-len(by_label[lab]), lab))
    chosen = set(ranked[:n_classes])
    rng = np.random.default_rng(seed)
    train = [(by_label[lab][i], lab) for lab in sorted(chosen)
             for i in sorted(rng.permutation(len(by_label[lab]))[:cap])]
    test = [(t, lab) for t, lab in test if lab in chosen]
    d = out / f"brands-s{seed}"
    return Proxy("brands", d / "train.csv", d / "test.csv", len(chosen), _write(d / "train.csv", train),
                 _write(d / "test.csv", test))


def experiment(proxy: Proxy, model: str, seed: int, out: Path, overrides: tuple[str, ...], threads: int | None):
    """The `shape: labeled` experiment of a proxy: defaults, plus the setting's overrides."""
    from embedft.config import apply_overrides, config_from_dict

    values = {"name": f"{proxy.name}-s{seed}",
              "data": {"train": str(proxy.train), "eval": str(proxy.test), "split": "given", "shape": "labeled"},
              "model": {"name": model},
              "train": {"seed": seed, "output_dir": str(out), "threads": threads},
              "eval": {"tasks": ["classification"], "linear_probe": True},
              "tracking": {"enabled": False}}
    return config_from_dict(apply_overrides(values, list(overrides)))


def run_one(proxy: Proxy, setting: str, overrides: tuple[str, ...], seed: int, args) -> dict:
    from embedft.recipes.train import run_train

    cfg = experiment(proxy, args.model, seed, Path(args.out) / "runs" / f"{proxy.name}-{setting}-s{seed}", overrides,
                     args.threads)
    t0 = time.perf_counter()
    summary = run_train(cfg, progress=False)
    m = summary["metrics"]
    row = {"proxy": proxy.name, "setting": setting, "seed": seed, "classes": proxy.n_classes,
           "train": proxy.n_train, "test": proxy.n_test, "steps": summary["steps"],
           "epochs": summary.get("epochs_done"), "best_epoch": summary.get("best_epoch"),
           "wall_s": round(time.perf_counter() - t0, 1),
           # the kept epoch's validation kNN macro-F1 (carved from the training file): what a setting is chosen on
           "val/macro_f1": m.get("train/best_val/macro_f1")}
    for k in METRICS:
        row[f"base/{k}"] = m.get(f"base/classification/{k}")
        row[f"adapted/{k}"] = m.get(f"adapted/classification/{k}")
    return row


def table(rows: list[dict]) -> str:
    """Per (proxy, setting): mean over seeds, and per seed, base vs adapted."""
    head = ("| proxy | setting | seeds | base acc | base F1 | base probe F1 | adapted acc | adapted F1 | "
            "F1 delta | adapted probe F1 | val F1 | steps | best/epochs | wall s |")
    lines = [head, "|" + "---|" * 14]
    keys = list(dict.fromkeys((r["proxy"], r["setting"]) for r in rows))
    for proxy, setting in keys:
        rs = [r for r in rows if r["proxy"] == proxy and r["setting"] == setting]
        mean = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        deltas = [r["adapted/macro_f1"] - r["base/macro_f1"] for r in rs]
        spread = f" ({min(deltas):+.4f}..{max(deltas):+.4f})" if len(rs) > 1 else ""
        vals = [r["val/macro_f1"] for r in rs if r.get("val/macro_f1") is not None]
        val = f"{statistics.fmean(vals):.4f}" if len(vals) == len(rs) else "-"
        lines.append(f"| {proxy} | {setting} | {len(rs)} | {mean('base/accuracy'):.4f} | {mean('base/macro_f1'):.4f} | "
                     f"{mean('base/probe/macro_f1'):.4f} | {mean('adapted/accuracy'):.4f} | "
                     f"{mean('adapted/macro_f1'):.4f} | {statistics.fmean(deltas):+.4f}{spread} | "
                     f"{mean('adapted/probe/macro_f1'):.4f} | {val} | {mean('steps'):.0f} | "
                     f"{', '.join(str(r['best_epoch']) + '/' + str(r['epochs']) for r in rs)} | "
                     f"{mean('wall_s'):.0f} |")
    return "\n".join(lines)


def parse_settings(items: list[str] | None, defaults: bool = True,
                   before: tuple[str, ...] | None = BEFORE) -> dict[str, tuple[str, ...]]:
    """`NAME:k=v,k=v` -> {NAME: (k=v, ...)}; `defaults` unless told not to, `before` when none is given (and
    `before` is not None)."""
    settings: dict[str, tuple[str, ...]] = {"defaults": ()} if defaults else {}
    if not items and before is not None:
        settings["before"] = before
    for item in items or []:
        name, _, rest = item.partition(":")
        settings[name] = tuple(o for o in rest.split(",") if o)
    return settings


def argument_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options every PriceRunner quality bench takes (this one and bench_pairs.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=str(PRICERUNNER))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--setting", action="append")
    p.add_argument("--no-defaults", action="store_true",
                   help="skip the defaults rows (deterministic on a CPU: an earlier invocation's stand)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=out)
    return p


def load_offers(data: str) -> list[tuple[str, int, str, str]] | None:
    """The offers of --data (`read_offers`), offline and quiet as a bench runs; None (and why, on stderr) when the
    file is missing."""
    if not Path(data).is_file():
        print(f"{data}: not found (the PriceRunner offers, ../shared/datasets/pricerunner)", file=sys.stderr)
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    return read_offers(Path(data))


def report(rows: list[dict], markdown: str, out: Path, what: str) -> None:
    """Print the date, machine and `what` over the table, and keep the rows in out/results.json."""
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, {what}\n")
    print(markdown)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__.splitlines()[0], "/tmp/bench-labeled")
    p.add_argument("--proxies", default="categories,products,fewshot,brands")
    p.add_argument("--cat-train", type=int, default=3000)
    p.add_argument("--cat-test", type=int, default=2000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--min-offers", type=int, default=10)
    p.add_argument("--test-share", type=float, default=0.3)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--brand-classes", type=int, default=77)
    p.add_argument("--brand-cap", type=int, default=130)
    args = p.parse_args(argv)
    settings = parse_settings(args.setting, defaults=not args.no_defaults)
    offers = load_offers(args.data)
    if offers is None:
        return 2
    out = Path(args.out)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        proxies = []
        for name in args.proxies.split(","):
            if name == "categories":
                proxies.append(make_categories(offers, out / "data", seed, args.cat_train, args.cat_test))
            elif name == "products":
                proxies.append(make_products(offers, out / "data", seed, args.classes, args.min_offers, args.test_share))
            elif name == "fewshot":
                proxies.append(make_products(offers, out / "data", seed, args.classes, args.min_offers,
                                             args.test_share, shots=args.shots))
            elif name == "brands":
                proxies.append(make_brands(offers, out / "data", seed, args.brand_classes, args.brand_cap))
            else:
                p.error(f"unknown proxy {name!r}; use categories, products, fewshot, brands")
        for proxy in proxies:
            for setting, overrides in settings.items():
                row = run_one(proxy, setting, overrides, seed, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows, table(rows), out, f"model {args.model}, seeds {args.seeds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
