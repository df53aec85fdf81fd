"""benchmarks/recall_breakdown.py on the sample data with a tiny random BERT: the buckets cover
every query, the kinds of miss share out all the lost recall, --compare reports the other model's recall and
the queries that changed; by default it reads the validation products training carves, never the eval split;
and each kind of miss on planted titles."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def breakdown(benchmark_script):
    return benchmark_script("recall_breakdown")


def _run(breakdown, monkeypatch, capsys, *argv) -> dict:
    monkeypatch.setattr(sys, "argv", ["recall_breakdown.py", *map(str, argv)])
    breakdown.main()
    out = capsys.readouterr().out
    overall = [float(x) for x in re.findall(r"(?:recall|r_cap)@10 ([0-9.]+)", out)]
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+(\d+|\d+-\d+|>=\d+)\s+\d+\s", line)]
    kinds = {line[:16].strip(): line[16:].split() for line in out.splitlines() if line[:16].strip() in breakdown.KINDS}
    return {"overall": overall, "rows": rows, "queries": int(re.search(r"over (\d+) queries", out).group(1)),
            "kinds": kinds}


def test_buckets_cover_every_query_and_compare_counts_changes(breakdown, tiny_bert_experiment, tiny_bert_adapter,
                                                               monkeypatch, capsys):
    experiment, adapter = tiny_bert_experiment, tiny_bert_adapter
    base = _run(breakdown, monkeypatch, capsys, experiment, "--split", "test", "--samples", 1)
    tuned = _run(breakdown, monkeypatch, capsys, experiment, "--split", "test", "--adapter", adapter,
                 "--compare", "base", "--samples", 1)

    assert 0 < len(base["rows"]) == len(tuned["rows"]) <= len(breakdown.BUCKETS)
    # The buckets hold every query once, and their shares of the lost recall add up to 100%.
    assert sum(int(r[1]) for r in tuned["rows"]) == tuned["queries"] == base["queries"] > 0
    assert sum(float(r[4].rstrip("%")) for r in tuned["rows"]) == pytest.approx(100, abs=0.3)
    # --compare base: the compared column is the base model's own breakdown.
    assert tuned["overall"][1] == pytest.approx(base["overall"][0])
    assert [r[5] for r in tuned["rows"]] == [r[3] for r in base["rows"]]
    assert tuned["overall"][0] != pytest.approx(base["overall"][0])
    assert sum(int(r[6]) for r in tuned["rows"]) > 0
    # Every kind has its row, and they share out all the lost recall (a random model loses plenty).
    assert list(tuned["kinds"]) == list(breakdown.KINDS)
    assert sum(int(q) for q, _ in tuned["kinds"].values()) > 0
    assert sum(float(share.rstrip("%")) for _, share in tuned["kinds"].values()) == pytest.approx(100, abs=0.3)

    # R_cap divides by min(|positives|, 10) <= |positives|: never below standard recall.
    capped = _run(breakdown, monkeypatch, capsys, experiment, "--split", "test", "--metric", "r_cap", "--samples", 0)
    assert capped["overall"][0] >= base["overall"][0] and capped["queries"] == base["queries"]

    same = _run(breakdown, monkeypatch, capsys, experiment, "--split", "test", "--adapter", adapter,
                "--compare", adapter, "--samples", 0)
    assert [int(r[6]) for r in same["rows"]] == [0] * len(base["rows"])


def test_the_default_split_is_the_carved_validation_never_the_eval_split(breakdown, tiny_bert_experiment,
                                                                        monkeypatch, capsys):
    from embedft.config import load_config
    from embedft.data.examples import carve_validation, load_splits, retrieval_task

    cfg = load_config(tiny_bert_experiment, ["train.val_fraction=0.3"])
    train, test, _ = load_splits(cfg.data)
    _, val = carve_validation(train, 0.3, cfg.data.split_seed)
    val_queries, test_queries = len(retrieval_task(val)), len(retrieval_task(test))
    assert val_queries != test_queries  # the counts below tell the splits apart

    got = _run(breakdown, monkeypatch, capsys, tiny_bert_experiment, "-o", "train.val_fraction=0.3", "--samples", 0)
    assert got["queries"] == val_queries
    assert _run(breakdown, monkeypatch, capsys, tiny_bert_experiment, "--split", "test", "--samples", 0)["queries"] \
        == test_queries
    # No validation to carve: a clear stop naming the option, not a silent fall back to the eval split.
    monkeypatch.setattr(sys, "argv", ["recall_breakdown.py", str(tiny_bert_experiment), "-o", "train.val_fraction=0",
                                      "-o", "train.select_best=false", "-o", "train.patience=null"])
    with pytest.raises(SystemExit, match="train.val_fraction=0.0 carves no validation"):
        breakdown.main()


def test_miss_kind_takes_the_first_reason_that_holds(breakdown):
    corpus = ["washer dryer", "washer dryer", "bosch wab28161gb 6kg washing machine", "bosch wab28162gb 6kg",
              "samsung galaxy s9 64gb black"]
    labels = ["washers", "washers", "washers", "washers", "phones"]
    kind = breakdown.miss_kind
    # Another product's very title among the wrong hits comes first, even for a short title.
    assert kind("washer dryer", [1, 4], corpus, labels, "washers") == "identical title"
    assert kind("washer dryer 8kg", [1], corpus, labels, "washers") == "short title"
    # A near twin: every wrong hit is of the query's category.
    assert kind("bosch wab28161gb 6kg washing machine", [3, 1], corpus, labels, "washers") == "same label"
    assert kind("bosch wab28161gb 6kg washing machine", [3, 4], corpus, labels, "washers") == "other label"
    assert kind("bosch wab28161gb 6kg washing machine", [3], corpus, None, None) == "other label"
