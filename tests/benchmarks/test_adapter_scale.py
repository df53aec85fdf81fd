"""benchmarks/adapter_scale.py on the sample data with a tiny random BERT: alpha 0 is the base model's
validation metric (the update scaled away) and alpha 1 the adapter's, each as `validate` measures it."""

import json
import sys

import pytest


def test_alpha_zero_is_the_base_and_alpha_one_the_adapter(benchmark_script, tiny_bert_experiment, tiny_bert_adapter,
                                                           validation_recall, monkeypatch, capsys):
    script = benchmark_script("adapter_scale")
    monkeypatch.setattr(sys, "argv", ["adapter_scale.py", str(tiny_bert_experiment), str(tiny_bert_adapter),
                                      "--alphas", "0,0.5,1"])
    script.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["metric"] == "val/recall@10" and [r["alpha"] for r in report["results"]] == [0, 0.5, 1]
    got = [r["val/recall@10"] for r in report["results"]]

    assert got[0] == pytest.approx(validation_recall(tiny_bert_experiment, None), abs=1e-9)
    assert got[2] == pytest.approx(validation_recall(tiny_bert_experiment, tiny_bert_adapter), abs=1e-9)
    assert got[0] != pytest.approx(got[2])  # the adapter changes the ranking, so the two ends differ
