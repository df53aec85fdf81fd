"""benchmarks/bench_labeled.py: its proxies keep test texts out of training (products on one side
for categories, per-class shares for products, N shots for few-shot), its experiments are labeled
experiments with the defaults plus the setting's overrides, and its table averages over seeds."""

import csv

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_labeled")


def _offers():
    """PriceRunner-like offers: (title, cluster, category, product name); 30 products of 12 offers, one title
    shared by two; 4 makers."""
    rows = [(f"brand{c} model {c} offer {j}", c, f"cat{c % 3}", f"Maker{c % 4} Model {c}")
            for c in range(1, 31) for j in range(12)]
    rows.append(("brand1 model 1 offer 0", 2, "cat2", "Maker2 Model 2"))  # the same title in two products: ambiguous
    return rows


def _read(path):
    with open(path, newline="") as f:
        return [tuple(r) for r in csv.reader(f)][1:]


def test_categories_proxy_keeps_products_on_one_side(bench, tmp_path):
    offers = _offers()
    p = bench.make_categories(offers, tmp_path, seed=0, n_train=100, n_test=40)
    train, test = _read(p.train), _read(p.test)
    assert (p.n_train, p.n_test, len(train), len(test)) == (100, 40, 100, 40)
    product = {t: c for t, c, _, _ in offers}
    assert all(product[t] % 5 == 0 for t, _ in test) and all(product[t] % 5 for t, _ in train)
    assert not {t for t, _ in train} & {t for t, _ in test}
    again = bench.make_categories(offers, tmp_path / "again", seed=1, n_train=100, n_test=40)
    assert _read(again.test) == test and _read(again.train) != train  # the seed draws training texts only


def test_products_and_fewshot_proxies(bench, tmp_path):
    p = bench.make_products(_offers(), tmp_path, seed=0, n_classes=10, min_offers=10, test_share=0.25)
    train, test = _read(p.train), _read(p.test)
    assert p.n_classes == 10 and len({lab for _, lab in train}) == 10 == len({lab for _, lab in test})
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert "brand1 model 1 offer 0" not in {t for t, _ in train + test}  # a title of two products is left out
    per_class = {lab: sum(1 for _, x in test if x == lab) for _, lab in test}
    assert set(per_class.values()) <= {3}  # 25% of 11 or 12 titles
    few = bench.make_products(_offers(), tmp_path, seed=0, n_classes=10, min_offers=10, test_share=0.25, shots=4)
    assert _read(few.test) == test  # the same classes and test texts as the full proxy
    few_train = _read(few.train)
    assert {sum(1 for _, x in few_train if x == lab) for lab in per_class} == {4}
    assert set(few_train) <= set(train)


def test_brands_proxy_is_maker_within_category_split_by_product(bench, tmp_path):
    offers = _offers()
    p = bench.make_brands(offers, tmp_path, seed=0, n_classes=3, cap=20)
    train, test = _read(p.train), _read(p.test)
    product = {t: c for t, c, _, _ in offers}
    assert all(product[t] % 5 == 0 for t, _ in test) and all(product[t] % 5 for t, _ in train)
    assert not {t for t, _ in train} & {t for t, _ in test}
    labels = {lab for _, lab in train}
    assert p.n_classes == 3 == len(labels) and {lab for _, lab in test} == labels
    first = {}
    for t, c, _, _ in offers:
        first.setdefault(t, c)  # a title of two products keeps its first product's class
    assert all(lab == f"maker{first[t] % 4} / cat{first[t] % 3}" for t, lab in train + test)
    assert all(sum(1 for _, x in train if x == lab) == 20 for lab in labels)  # the cap, each class has more
    n_test = {lab: sum(1 for _, x in test if x == lab) for lab in labels}
    assert min(n_test.values()) >= 10  # only classes with >= 10 test offers are eligible
    again = bench.make_brands(offers, tmp_path / "again", seed=1, n_classes=3, cap=20)
    assert _read(again.test) == test and _read(again.train) != train  # the seed draws training texts only


def test_experiment_is_labeled_with_defaults_plus_the_setting(bench, tmp_path):
    from embedft.config import TrainConfig

    p = bench.make_products(_offers(), tmp_path, seed=0, n_classes=10, min_offers=10, test_share=0.25)
    cfg = bench.experiment(p, "minilm", 3, tmp_path / "run", (), 1)
    assert (cfg.data.shape, cfg.data.split, cfg.train.seed, cfg.eval.linear_probe) == ("labeled", "given", 3, True)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_sampling) == (TrainConfig.lr, TrainConfig.epochs, "auto")
    before = bench.experiment(p, "minilm", 3, tmp_path / "run", bench.BEFORE, 1)
    assert (before.train.batch_sampling, before.train.lr, before.train.val_fraction) == ("random", 2e-4, 0.0)
    assert bench.parse_settings(None) == {"defaults": (), "before": bench.BEFORE}
    assert bench.parse_settings(["hot:train.lr=1e-3,train.epochs=2"]) == {
        "defaults": (), "hot": ("train.lr=1e-3", "train.epochs=2")}
    assert bench.parse_settings(["hot:train.lr=1e-3"], defaults=False) == {"hot": ("train.lr=1e-3",)}
    assert bench.parse_settings(None, defaults=False) == {"before": bench.BEFORE}


def test_table_averages_seeds_and_shows_the_spread(bench):
    def row(seed, base, adapted, val):
        r = {"proxy": "fewshot8", "setting": "defaults", "seed": seed, "steps": 10, "epochs": 3, "best_epoch": 2,
             "wall_s": 5.0, "val/macro_f1": val}
        for k in bench.METRICS:
            r[f"base/{k}"], r[f"adapted/{k}"] = base, adapted
        return r

    table = bench.table([row(0, 0.5, 0.6, 0.8), row(1, 0.7, 0.75, 0.9)])
    line = table.splitlines()[2]
    assert line.startswith("| fewshot8 | defaults | 2 | 0.6000 | 0.6000 | 0.6000 | 0.6750 | 0.6750 | +0.0750 "
                           "(+0.0500..+0.1000) | 0.6750 | 0.8500 | 10 | 2/3, 2/3 |"), line
    # a run without a validation split (the `before` setting) has no validation figure to average
    line = bench.table([row(0, 0.5, 0.6, None), row(1, 0.7, 0.75, 0.9)]).splitlines()[2]
    assert "| 0.6750 | - | 10 |" in line, line
