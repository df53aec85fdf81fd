"""Helpers of the serving tests: adapters with random LoRA weights on the tiny models, and the vectors
each one gives alone (`load_adapter` + `Encoder.encode`), the reference a server must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TEXTS = ["apple iphone 8 plus 64gb silver", "tv", "How do I reset my password?", "bosch serie 6 washing machine",
         "£499.99 – 20% off!!!", "a", " ".join(["long text that is cut at max length"] * 40)]
FAMILIES = ("bert", "qwen3")


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, targets: tuple[str, ...] | None = None,
                 **model_kw) -> Path:
    """A saved adapter whose lora_B is random (so each adapter embeds differently)."""
    from embedft.config import LoraConfig, ModelConfig
    from embedft.lora import apply_lora, save_adapter
    from embedft.models import load_encoder

    torch.manual_seed(seed)
    enc = apply_lora(load_encoder(ModelConfig(name=str(model_dir), **model_kw)), LoraConfig(r=r, target_modules=targets))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return save_adapter(enc, out)


def reference(model_dir: Path, adapter: Path | None, texts=TEXTS, **model_kw) -> dict[str, np.ndarray]:
    """What the adapter (or the base) gives alone: {'document': (N, D), 'query': (N, D)}."""
    from embedft.config import ModelConfig
    from embedft.lora import load_adapter
    from embedft.models import load_encoder

    enc = load_encoder(ModelConfig(name=str(model_dir), **model_kw))
    if adapter is not None:
        enc = load_adapter(enc, adapter)
    enc.eval()
    return {"document": enc.encode(texts), "query": enc.encode(texts, is_query=True)}


def assert_close(got: np.ndarray, want: np.ndarray, atol: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
