"""Shared fixtures: tiny randomly initialised models (BERT-like, Qwen3-like), built offline; the
benchmark scripts loaded as modules."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# The correctness tests that matter on a GPU (padding, cached negatives, checkpointing) run on
# each of these; `make gpu-check` on a CUDA machine runs the cuda ones, elsewhere they skip.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from embedft_testing.synthetic import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    from embedft_testing.synthetic import tiny_qwen3

    return tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_bert_adapter(tiny_bert_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny BERT whose B matrices are non-zero, so it embeds differently from the base."""
    from embedft.config import LoraConfig, ModelConfig
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import apply_lora, save_adapter

    torch.manual_seed(0)
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    apply_lora(enc, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_adapter(enc, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_bert_experiment(tiny_bert_dir, tmp_path_factory) -> Path:
    """experiments/default.yaml with the tiny BERT as its model and its data path made absolute."""
    import yaml

    cfg = yaml.safe_load((REPO / "experiments" / "default.yaml").read_text())
    cfg["model"]["name"] = str(tiny_bert_dir)
    cfg["data"]["train"] = str(REPO / cfg["data"]["train"])
    path = tmp_path_factory.mktemp("exp") / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(params=["bert", "qwen3"])
def tiny_model_dir(request, tiny_bert_dir, tiny_qwen3_dir) -> Path:
    """Each test using this runs once per family."""
    return tiny_bert_dir if request.param == "bert" else tiny_qwen3_dir


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema; copying it skips the slow migrations per store."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each test using this runs on the CPU, and on CUDA when there is one (fp32 on both)."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def benchmark_script():
    """Load a script of benchmarks/ (or another folder) as a module, afresh on each call:
    benchmark_script("bench_encode"), benchmark_script("gpu_session", "tools")."""
    loaded = []

    def load(name: str, folder: str = "benchmarks"):
        spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        loaded.append(name)
        spec.loader.exec_module(mod)
        return mod

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture
def validation_recall():
    """validation_recall(experiment, adapter or None): recall@10 on the experiment's validation split as
    `validate` measures it at each epoch (None: the base model)."""
    import torch

    from embedft.config import load_config
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter
    from embedft.recipes.common import prepare_data
    from embedft.training.validation import val_set_for, validate

    def measure(experiment, adapter) -> float:
        cfg = load_config(experiment)
        data = prepare_data(cfg)
        enc = load_encoder(cfg.model)
        if adapter:
            enc = load_adapter(enc, adapter)
        enc.eval()
        val = val_set_for(enc, data.fit, data.val, cfg)
        return validate(enc, val, None, None, 32, torch.device("cpu"), cfg.train.seed)["val/recall@10"]

    return measure


@pytest.fixture
def disk(monkeypatch):
    """disk(at, after, code, nth): the nth write of file `at` fails after `after` bytes (or "before" its rename)
    with errno `code`, once; returns the Point (`.fired` says it was reached). tests/faults/disk.py."""
    import errno

    from faults.disk import Point, install

    return lambda at, after=7, code=errno.ENOSPC, nth=1: install(Point(at, after, "fail", code, nth),
                                                                 monkeypatch.setattr)
