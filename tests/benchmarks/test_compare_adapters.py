"""benchmarks/compare_adapters.py on the sample data with a tiny random BERT: each model's recall@10 is the one
`validate` measures on the same validation split, a model against itself differs by exactly nothing, and the
per-query differences and their interval agree with the two means (recall@10, R_cap@10, R_cap@1, MRR@10, kNN)."""

import json
import sys

import pytest


def test_each_side_is_what_validation_measures_and_a_model_against_itself_differs_by_nothing(
        benchmark_script, tiny_bert_experiment, tiny_bert_adapter, validation_recall, monkeypatch, capsys):
    script = benchmark_script("compare_adapters")
    monkeypatch.setattr(sys, "argv", ["compare_adapters.py", str(tiny_bert_experiment), "base",
                                      str(tiny_bert_adapter), "base", "--boot", "200"])
    script.main()
    adapted, itself = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    base = validation_recall(tiny_bert_experiment, None)
    tuned = validation_recall(tiny_bert_experiment, tiny_bert_adapter)
    assert base != pytest.approx(tuned)  # the adapter changes the ranking
    assert adapted["recall@10"]["A"] == pytest.approx(base, abs=1e-4)
    assert adapted["recall@10"]["B"] == pytest.approx(tuned, abs=1e-4)
    for name in ("recall@10", "r_cap@10", "r_cap@1", "mrr@10", "knn accuracy"):
        row = adapted[name]
        assert row["B-A"] == pytest.approx(row["B"] - row["A"], abs=2e-4)
        lo, hi = row["95%"]
        assert lo <= row["B-A"] <= hi
        assert itself[name]["B-A"] == 0 and itself[name]["95%"] == [0, 0]
        assert itself[name]["B better / worse"] == [0, 0]
    for side in ("A", "B"):  # a query's first positive at rank 1 is a reciprocal rank of 1: MRR is never below
        assert adapted["r_cap@1"][side] <= adapted["mrr@10"][side] <= 1
    assert adapted["mrr@10"]["A"] != adapted["mrr@10"]["B"]
    assert itself["knn macro_f1"]["A"] == itself["knn macro_f1"]["B"]
    assert adapted["knn macro_f1"]["A"] == itself["knn macro_f1"]["A"]
    assert 0 < adapted["queries"] <= adapted["corpus"]
