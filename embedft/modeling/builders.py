"""The one way to get an encoder to train: the base loaded, its frozen weights cast, LoRA attached.

The recipes, the benchmarks and the tests all build through here, so a setting such as
`train.base_dtype` means the same everywhere.
"""

from __future__ import annotations

import torch

from embedft.config import LoraConfig, ModelConfig
from embedft.modeling.encoder import Encoder, load_encoder
from embedft.modeling.lora import apply_lora


def make_trainable(encoder: Encoder, lora: LoraConfig, base_dtype: torch.dtype = torch.float32) -> Encoder:
    """Cast the frozen base to `base_dtype` and attach LoRA (fp32 adapter weights) in place; returns it."""
    if base_dtype != torch.float32:
        encoder.backbone.to(base_dtype)  # before LoRA: peft keeps the adapter weights in fp32
    return apply_lora(encoder, lora)


def build_encoder(model: ModelConfig, device: str | torch.device = "cpu", lora: LoraConfig | None = None,
                  base_dtype: torch.dtype = torch.float32) -> Encoder:
    """The base model as an Encoder on `device`; with `lora`, trainable (`make_trainable`)."""
    encoder = load_encoder(model, device, lora)
    return encoder if lora is None else make_trainable(encoder, lora, base_dtype)
