"""benchmarks/deploy_check.py on the sample data with a tiny random BERT: the export's index
build + search --classify gives exactly the kNN classification figures `embedft eval` reported."""

import json
import shutil
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from embedft.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_deployed_classification_equals_the_evaluated_one(benchmark_script, tiny_bert_experiment, tiny_bert_adapter,
                                                           tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_bert_experiment, run / "config.yaml")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    res = CliRunner().invoke(main, ["eval", str(run / "config.yaml"), "--adapter", str(tiny_bert_adapter), "--no-base",
                                    "--out", str(run / "eval"), "-o", "tracking.enabled=false",
                                    "-o", "eval.tasks=[classification]"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export", "--adapter", str(tiny_bert_adapter), "--out", str(tmp_path / "export")])
    assert res.exit_code == 0, res.output

    mod = benchmark_script("deploy_check")
    monkeypatch.setattr(sys, "argv", ["deploy_check.py", str(run), str(tmp_path / "export"), "--work", str(tmp_path / "w")])
    mod.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["k"] == cfg["eval"].get("knn_k", 10) and result["eval_rows"] > 100
    assert result["deployed_accuracy"] == result["evaluated_accuracy"]
    assert result["deployed_macro_f1"] == result["evaluated_macro_f1"]
    assert 0 < result["evaluated_macro_f1"] < 1  # a random adapter: not a trivially perfect or empty vote
