"""benchmarks/recall_breakdown.py on the sample data with a tiny random BERT: the buckets cover
every query, and --compare reports the other model's recall and the queries that changed."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "recall_breakdown.py"


@pytest.fixture(scope="module")
def breakdown():
    spec = importlib.util.spec_from_file_location("recall_breakdown", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def experiment(tiny_bert_dir, tmp_path_factory) -> Path:
    cfg = yaml.safe_load((REPO / "experiments" / "default.yaml").read_text())
    cfg["model"]["name"] = str(tiny_bert_dir)
    cfg["data"]["train"] = str(REPO / cfg["data"]["train"])
    path = tmp_path_factory.mktemp("exp") / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def adapter(tiny_bert_dir, tmp_path_factory) -> Path:
    """A LoRA adapter whose B matrices are non-zero, so it embeds differently from the base."""
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
    return save_adapter(enc, tmp_path_factory.mktemp("adapter") / "adapter")


def _run(breakdown, monkeypatch, capsys, *argv) -> dict:
    monkeypatch.setattr(sys, "argv", ["recall_breakdown.py", *map(str, argv)])
    breakdown.main()
    out = capsys.readouterr().out
    overall = [float(x) for x in re.findall(r"recall@10 ([0-9.]+)", out)]
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+(\d+|\d+-\d+|>=\d+)\s+\d+\s", line)]
    return {"overall": overall, "rows": rows, "queries": int(re.search(r"over (\d+) queries", out).group(1))}


def test_buckets_cover_every_query_and_compare_counts_changes(breakdown, experiment, adapter, monkeypatch, capsys):
    base = _run(breakdown, monkeypatch, capsys, experiment, "--samples", 1)
    tuned = _run(breakdown, monkeypatch, capsys, experiment, "--adapter", adapter, "--compare", "base", "--samples", 1)

    assert 0 < len(base["rows"]) == len(tuned["rows"]) <= len(breakdown.BUCKETS)
    # The buckets hold every query once, and their shares of the lost recall add up to 100%.
    assert sum(int(r[1]) for r in tuned["rows"]) == tuned["queries"] == base["queries"] > 0
    assert sum(float(r[4].rstrip("%")) for r in tuned["rows"]) == pytest.approx(100, abs=0.3)
    # --compare base: the compared column is the base model's own breakdown.
    assert tuned["overall"][1] == pytest.approx(base["overall"][0])
    assert [r[5] for r in tuned["rows"]] == [r[3] for r in base["rows"]]
    assert tuned["overall"][0] != pytest.approx(base["overall"][0])
    assert sum(int(r[6]) for r in tuned["rows"]) > 0

    same = _run(breakdown, monkeypatch, capsys, experiment, "--adapter", adapter, "--compare", adapter, "--samples", 0)
    assert [int(r[6]) for r in same["rows"]] == [0] * len(base["rows"])
