"""Helpers of the serving tests: adapters with random LoRA weights on the tiny models, and the vectors
each one gives alone (`load_adapter` + `Encoder.encode`), the reference a server must match."""

from __future__ import annotations

import threading
import time
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
    from embedft.modeling.builders import build_encoder
    from embedft.modeling.lora import save_adapter

    torch.manual_seed(seed)
    enc = build_encoder(ModelConfig(name=str(model_dir), **model_kw), "cpu", LoraConfig(r=r, target_modules=targets))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return save_adapter(enc, out)


def reference(model_dir: Path, adapter: Path | None, texts=TEXTS, **model_kw) -> dict[str, np.ndarray]:
    """What the adapter (or the base) gives alone: {'document': (N, D), 'query': (N, D)}."""
    from embedft.config import ModelConfig
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter

    enc = load_encoder(ModelConfig(name=str(model_dir), **model_kw))
    if adapter is not None:
        enc = load_adapter(enc, adapter)
    enc.eval()
    return {"document": enc.encode(texts), "query": enc.encode(texts, is_query=True)}


def assert_close(got: np.ndarray, want: np.ndarray, atol: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def engine_for(fm: dict, adapters=("a1", "a2", "a3"), **cfg):
    """An engine (not started) serving the family's base as 'base' and the named adapters."""
    from embedft.config import ModelConfig
    from embedft.modeling.encoder import load_encoder
    from embedft.serving.config import ServeConfig
    from embedft.serving.engine import Engine

    engine = Engine(load_encoder(ModelConfig(name=str(fm["base"]))), "base", ServeConfig(**cfg))
    for name in adapters:
        engine.add_adapter(name, fm["adapters"][name])
    return engine


class LiveServer:
    """create_app(engine) under uvicorn in a thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, engine):
        import openai
        import uvicorn

        from embedft.serving.app import create_app

        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(600):  # up to a minute on a loaded machine
            if self.server.started:
                break
            time.sleep(0.1)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
