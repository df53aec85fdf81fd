"""The one way to get an encoder to train: the base loaded, its frozen weights cast, LoRA attached.

The recipes, the benchmarks and the tests all build through here, so a setting such as
`train.base_dtype` means the same everywhere.
"""

from __future__ import annotations

import torch

from embedft.config import LoraConfig, ModelConfig
from embedft.modeling.encoder import Encoder, EncoderSpec, load_encoder
from embedft.modeling.lora import apply_lora
from embedft.modeling.quantization import is_quantized


def make_trainable(encoder: Encoder, lora: LoraConfig, base_dtype: torch.dtype = torch.float32) -> Encoder:
    """Cast the frozen base to `base_dtype` and attach LoRA (fp32 adapter weights) in place; returns it.
    A base quantised by bitsandbytes keeps its dtypes (its other weights were loaded in bf16)."""
    if base_dtype != torch.float32 and not is_quantized(encoder.backbone):
        encoder.backbone.to(base_dtype)  # before LoRA: peft keeps the adapter weights in fp32
    return apply_lora(encoder, lora)


def build_encoder(model: ModelConfig, device: str | torch.device = "cpu", lora: LoraConfig | None = None,
                  base_dtype: torch.dtype = torch.float32, quantization: str | None = None) -> Encoder:
    """The base model as an Encoder on `device`; with `lora`, trainable (`make_trainable`). With
    `quantization` (nf4, int8) its linear layers are loaded quantised by bitsandbytes (CUDA only)."""
    encoder = load_encoder(model, device, lora, quantization)
    return encoder if lora is None else make_trainable(encoder, lora, base_dtype)


def load_quantized(model: ModelConfig, device: str | torch.device, lora: LoraConfig | None, quantization: str,
                   spec: EncoderSpec) -> Encoder:
    """The base loaded again quantised by bitsandbytes (nf4, int8) to train on, keeping `spec`: the
    unquantised load's. Its fingerprint ties the adapter to the base it is evaluated on and merged
    into, which quantised weights cannot give (`lora.check_adapter_base`)."""
    encoder = load_encoder(model, device, lora, quantization)
    encoder.spec = spec
    return encoder
