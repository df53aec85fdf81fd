"""Registering an export in the MLflow model registry (SQLite store), linked to its training run."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedft.cli import main
from embedft.config import LoraConfig, ModelConfig
from embedft.errors import TrackingError
from embedft.export.merge import export_merged
from embedft.modeling.encoder import load_encoder
from embedft.modeling.lora import apply_lora, save_adapter
from embedft.tracking import mlflow as tracking
from embedft.tracking import runs

TEXTS = ["apple iphone 8 plus 64gb silver", "tv", "How do I reset my password?", "£499.99 – 20% off!!!",
         " ".join(["long text that is truncated at max length"] * 40)]
RECALL = "adapted/retrieval/recall_at_10"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _adapter(model_dir: Path, out: Path, run_id: str) -> Path:
    torch.manual_seed(0)
    enc = apply_lora(load_encoder(ModelConfig(name=str(model_dir))), LoraConfig(r=4))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return save_adapter(enc, out, {"experiment": "t", "mlflow_run_id": run_id})


def test_register_export_links_run_and_loads_identically(tiny_bert_dir, template_db, tmp_path, monkeypatch):
    import mlflow.sentence_transformers
    from sentence_transformers import SentenceTransformer

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    client = _client(uri)

    # The training run the adapter came from, with its final metrics.
    exp_id = client.create_experiment("train", artifact_location=tracking.artifact_location(uri, "train"))
    run = client.create_run(exp_id, run_name="train-1")
    rid = run.info.run_id
    client.log_metric(rid, RECALL, 0.75)
    client.log_metric(rid, "base/retrieval/recall_at_10", 0.5)
    client.log_metric(rid, "train/loss", 1.25)
    client.set_terminated(rid, "FINISHED")

    adapter = _adapter(tiny_bert_dir, tmp_path / "adapter", rid)
    export_dir = tmp_path / "export"
    export_merged(adapter, export_dir, probe_texts=TEXTS)

    res = runs.register_model(uri, export_dir, "tiny-bert", run_id=rid)
    assert res["name"] == "tiny-bert" and res["version"] == 1 and res["run_id"] == rid
    assert res["source"] == f"{run.info.artifact_uri}/registered_model"
    mv = client.get_model_version("tiny-bert", "1")
    assert mv.run_id == rid and mv.source == res["source"] and mv.status == "READY"
    assert float(mv.tags[RECALL]) == 0.75 and float(mv.tags["base/retrieval/recall_at_10"]) == 0.5
    assert "train/loss" not in mv.tags  # only adapted/* and base/* metrics
    assert f"{RECALL}=0.7500" in mv.description
    assert client.get_run(rid).info.status == "FINISHED"  # the training run is only added to

    model = mlflow.sentence_transformers.load_model(f"models:/tiny-bert/{res['version']}").to("cpu")
    plain = SentenceTransformer(str(export_dir), device="cpu")
    for kw in ({}, {"prompt_name": "query"}):
        a = model.encode(TEXTS, normalize_embeddings=False, **kw)
        b = plain.encode(TEXTS, normalize_embeddings=False, **kw)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5, kw

    # CLI: a second export registers as version 2 of the same model, linked to the run from the
    # adapter's metadata, in its own artifact folder (version 1's files stay untouched).
    out = tmp_path / "export2"
    r = CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--out", str(out), "--register", "tiny-bert"])
    assert r.exit_code == 0, r.output
    assert "registered tiny-bert version 2" in r.output
    mv2 = client.get_model_version("tiny-bert", "2")
    assert mv2.run_id == rid and mv2.source.endswith("/registered_model_2") and float(mv2.tags[RECALL]) == 0.75

    # A run id this store does not know: a new run in the exports experiment holds the model.
    res3 = runs.register_model(uri, export_dir, "other", run_id="0" * 32, metrics={"adapted/x@10": 0.5})
    run3 = client.get_run(res3["run_id"])
    assert res3["version"] == 1 and res3["run_id"] != rid and run3.info.status == "FINISHED"
    assert client.get_experiment(run3.info.experiment_id).name == "embedft-exports"
    assert client.get_model_version("other", "1").tags == {"adapted/x_at_10": "0.5"}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match="not reachable"):
        runs.register_model(f"http://127.0.0.1:{port}", export_dir, "x", run_id=rid)
