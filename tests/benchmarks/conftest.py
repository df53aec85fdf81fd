"""Shared by the benchmark scripts' tests."""

import pytest


@pytest.fixture
def validation_recall():
    """validation_recall(experiment, adapter or None): recall@10 on the experiment's validation split as
    `validate` measures it at each epoch (None: the base model)."""
    import torch

    from embedft.config import load_config
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter
    from embedft.recipes.common import prepare_data
    from embedft.training.validation import build_val_set, validate

    def measure(experiment, adapter) -> float:
        cfg = load_config(experiment)
        data = prepare_data(cfg)
        enc = load_encoder(cfg.model)
        if adapter:
            enc = load_adapter(enc, adapter)
        enc.eval()
        val = build_val_set(enc, data.fit, data.val, cfg.train.val_max_queries, cfg.train.val_max_index,
                            cfg.eval.knn_k, cfg.train.seed)
        return validate(enc, val, None, None, 32, torch.device("cpu"), cfg.train.seed)["val/recall@10"]

    return measure
