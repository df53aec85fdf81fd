"""benchmarks/bench_pairs.py: its product-search data keeps every test name and title out of training, draws the
training rows by the seed (whole products for the matching task), its experiments are pairs (or grouped) experiments
with the defaults plus the setting's overrides, and its table averages over seeds."""

import csv

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_pairs")


def _offers():
    """PriceRunner-like offers: (title, cluster, category, product name); 20 products of 6 offers, every offer listed
    twice (two shops, one title), one title in a training and a test product, one name on both sides."""
    rows = [(f"brand{c} model {c} offer {j}", c, "cat", f"Maker Model {c}") for c in range(1, 21) for j in range(6)]
    rows += rows
    rows.append(("brand5 model 5 offer 0", 3, "cat", "Maker Model 3"))  # a test title under a training product
    rows.append(("brand7 model 7 offer 9", 7, "cat", "Maker Model 10"))  # a test name on a training product
    return rows


def _read(path):
    with open(path, newline="") as f:
        return [tuple(r) for r in csv.reader(f)]


def test_search_data_keeps_the_test_side_out_of_training(bench, tmp_path):
    train_csv, test_csv, n_train, n_queries = bench.make_search(_offers(), tmp_path, seed=0, n_train=50)
    train, test = _read(train_csv), _read(test_csv)
    assert train[0] == test[0] == ("query", "positive")
    train, test = train[1:], test[1:]
    assert (n_train, len(train), n_queries) == (50, 50, 4)  # products 5, 10, 15 and 20 are the test side
    assert len(set(train)) == len(train) and len(set(test)) == len(test) == 24  # each (name, title) once
    assert {q for q, _ in test} == {f"Maker Model {c}" for c in (5, 10, 15, 20)}
    test_texts = {t for row in test for t in row}
    assert not test_texts & {t for row in train for t in row}
    assert ("Maker Model 3", "brand5 model 5 offer 0") not in train and "Maker Model 10" not in {q for q, _ in train}
    again = bench.make_search(_offers(), tmp_path / "again", seed=1, n_train=50)
    assert _read(again[1])[1:] == test and _read(again[0])[1:] != train  # the seed draws training rows only


def test_catalog_task_turns_the_same_rows_round(bench, tmp_path):
    """--task catalog: a title is the query and its product's name the document, from the same rows."""
    search = [_read(p)[1:] for p in bench.make_search(_offers(), tmp_path, seed=0, n_train=50)[:2]]
    train_csv, test_csv, n_train, n_queries = bench.make_search(_offers(), tmp_path, seed=0, n_train=50,
                                                               task="catalog")
    assert train_csv.parent.name == "catalog-s0"
    train, test = _read(train_csv)[1:], _read(test_csv)[1:]
    assert sorted(train) == sorted((t, n) for n, t in search[0])
    assert sorted(test) == sorted((t, n) for n, t in search[1])
    assert (n_train, n_queries) == (50, 24)  # every test title is a query, its product's name the one positive
    assert {n for _, n in test} == {f"Maker Model {c}" for c in (5, 10, 15, 20)}


def test_matching_task_draws_whole_training_products_and_keeps_test_titles_out(bench, tmp_path):
    """--task matching: grouped (text, product) rows; training products whole (less any test title), drawn by the
    seed until the offers asked for; every test product's titles, each once."""
    offers = _offers() + [("solo", 21, "cat", "Maker Model 21")]  # a one-title training product
    train_csv, test_csv, n_train, n_queries = bench.make_matching(offers, tmp_path, seed=0, n_train=13)
    assert train_csv.parent.name == "matching-s0"
    train, test = _read(train_csv), _read(test_csv)
    assert train[0] == test[0] == ("text", "product")
    train, test = train[1:], test[1:]
    test_titles = {t for t, _ in test}
    whole = {str(c): {t for t, oc, _, _ in offers if oc == c} - test_titles for c in range(1, 22) if c % 5}
    drawn = {c: [t for t, pc in train if pc == c] for _, c in train}
    assert all(len(ts) == len(set(ts)) and set(ts) == whole[c] for c, ts in drawn.items())  # whole, each title once
    sizes = [len(ts) for ts in drawn.values()]
    assert n_train == len(train) == sum(sizes) >= 13 > n_train - max(sizes)  # stops once it has enough
    assert "21" not in bench.make_matching(offers, tmp_path / "all", seed=0, n_train=10_000)[0].read_text()
    assert whole["3"] == {f"brand3 model 3 offer {j}" for j in range(6)}  # product 3 lost the test title it had
    assert len(test) == len(set(test)) == n_queries == 24  # products 5, 10, 15, 20: 6 titles each, once
    assert {c for _, c in test} == {"5", "10", "15", "20"}
    assert not test_titles & {t for t, _ in train}
    again = bench.make_matching(offers, tmp_path / "again", seed=1, n_train=13)
    assert _read(again[1])[1:] == test and {c for _, c in _read(again[0])[1:]} != set(drawn)  # the seed draws
    cfg = bench.experiment(train_csv, test_csv, "minilm", 3, tmp_path / "run", (), 1, task="matching")
    assert (cfg.data.shape, cfg.data.text_column, cfg.data.group_column, cfg.data.split) == (
        "grouped", "text", "product", "given")
    assert (cfg.data.on_singleton, cfg.data.on_duplicate, cfg.train.batch_sampling) == ("warn", "warn", "auto")


def test_experiment_is_pairs_with_defaults_plus_the_setting(bench, tmp_path):
    from embedft.config import TrainConfig

    train_csv, test_csv, _, _ = bench.make_search(_offers(), tmp_path, seed=0, n_train=50)
    cfg = bench.experiment(train_csv, test_csv, "minilm", 3, tmp_path / "run", (), 1)
    assert (cfg.data.shape, cfg.data.split, cfg.data.query_column, cfg.data.positive_column, cfg.eval.tasks) == (
        "pairs", "given", "query", "positive", ("retrieval",))
    assert (cfg.train.seed, cfg.train.lr, cfg.train.epochs, cfg.loss.hard_negatives) == (3, TrainConfig.lr,
                                                                                         TrainConfig.epochs, 0)
    hn = bench.experiment(train_csv, test_csv, "minilm", 3, tmp_path / "run", ("loss.hard_negatives=1",), 1)
    assert hn.loss.hard_negatives == 1
    assert bench.parse_settings(None, before=None) == {"defaults": ()}


def test_table_averages_seeds(bench):
    def row(seed, base, adapted, val):
        r = {"setting": "defaults", "seed": seed, "steps": 10, "epochs": 3, "best_epoch": 2, "wall_s": 5.0,
             "val/recall@10": val, "val/mrr@10": val / 2}
        for k in bench.METRICS:
            r[f"base/{k}"], r[f"adapted/{k}"] = base, adapted
        return r

    line = bench.table([row(0, 0.5, 0.6, 0.8), row(1, 0.7, 0.8, 0.9)]).splitlines()[2]
    assert line.startswith("| defaults | 2 | 0.6000 | 0.7000 | 0.6000 | 0.7000 |"), line
    assert line.endswith("| 0.8500 | 0.4250 | 10 | 2/3, 2/3 | 5 |"), line
    head = bench.table([row(0, 0.5, 0.6, 0.8)]).splitlines()
    assert head[0].endswith("| val recall@10 | val mrr@10 | steps | best/epochs | wall s |")
    assert head[0].count("|") == head[1].count("|")
    missing = dict(row(0, 0.5, 0.6, 0.8), **{"val/mrr@10": None})  # a run without validation
    assert bench.table([missing]).splitlines()[2].endswith("| 0.8000 | - | 10 | 2/3 | 5 |")
