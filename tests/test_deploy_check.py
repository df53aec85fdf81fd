"""benchmarks/deploy_check.py on the sample data with a tiny random BERT: the export's index
build + search --classify gives exactly the kNN classification figures `embedft eval` reported."""

import importlib.util
import json
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from embedft.cli import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "deploy_check.py"


def test_deployed_classification_equals_the_evaluated_one(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    import torch

    from embedft.config import LoraConfig, ModelConfig
    from embedft.models import apply_lora, load_encoder, save_adapter

    torch.manual_seed(0)
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    apply_lora(enc, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = save_adapter(enc, tmp_path / "adapter")
    cfg = yaml.safe_load((REPO / "experiments" / "default.yaml").read_text())
    cfg["model"]["name"] = str(tiny_bert_dir)
    cfg["data"]["train"] = str(REPO / cfg["data"]["train"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["eval", str(run / "config.yaml"), "--adapter", str(adapter), "--no-base",
                                    "--out", str(run / "eval"), "-o", "tracking.enabled=false",
                                    "-o", "eval.tasks=[classification]"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--out", str(tmp_path / "export")])
    assert res.exit_code == 0, res.output

    spec = importlib.util.spec_from_file_location("deploy_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["deploy_check.py", str(run), str(tmp_path / "export"), "--work", str(tmp_path / "w")])
    mod.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["k"] == cfg["eval"].get("knn_k", 10) and result["eval_rows"] > 100
    assert result["deployed_accuracy"] == result["evaluated_accuracy"]
    assert result["deployed_macro_f1"] == result["evaluated_macro_f1"]
    assert 0 < result["evaluated_macro_f1"] < 1  # a random adapter: not a trivially perfect or empty vote
