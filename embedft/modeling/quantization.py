"""QLoRA: the frozen base loaded through bitsandbytes (`train.base_quantization`), or why it cannot be.

Only training uses the quantised base. The base evaluation, the final evaluation (the saved adapter
on the unquantised base) and the export load it unquantised, so what is reported is what ships.
"""

from __future__ import annotations

import logging
from typing import Any

from embedft.config import TrainConfig
from embedft.errors import ConfigError, ModelError

# bitsandbytes runs 4-bit and 8-bit matmuls on the CPU too, but not for training there: in 0.50.2 an
# eval-mode forward (validation, mining) repacks a 4-bit weight for CPU inference, and later training
# steps backpropagate through a kernel without autograd (torch warns of "silently incorrect behavior").
# embedft's QLoRA path is built and measured for CUDA alone (benchmarks/bench_qlora.py).
NEEDS_CUDA = "bitsandbytes' 4-bit and 8-bit kernels need a CUDA GPU here"
NOT_INSTALLED = "bitsandbytes is not installed"


def unavailable_reasons(quantization: str, device: str) -> list[str]:
    """Why `quantization` cannot train on `device` (a train.device value) on this machine; empty when it can.
    Imports neither bitsandbytes nor any model."""
    import importlib.util

    import torch

    reasons = []
    if importlib.util.find_spec("bitsandbytes") is None:
        reasons.append(NOT_INSTALLED)
    if device == "cpu":
        reasons.append(f"train.device=cpu, and {NEEDS_CUDA}")
    elif not torch.cuda.is_available():
        where = "runs on the CPU (no CUDA device here)" if device == "auto" else "but no CUDA device is available"
        reasons.append(f"train.device={device} {where}, and {NEEDS_CUDA}")
    return reasons


def check_quantization(train: TrainConfig) -> None:
    """Refuse train.base_quantization where it cannot run (no bitsandbytes, no CUDA device) before
    anything is read or loaded, with the reason and the fix."""
    if train.quantization is None:
        return
    reasons = unavailable_reasons(train.quantization, train.device)
    if not reasons:
        return
    fix = ("Install it on this CUDA machine (pip install bitsandbytes)" if reasons == [NOT_INSTALLED] else
           "Train on a CUDA machine with bitsandbytes installed (pip install bitsandbytes)")
    raise ConfigError(f"train.base_quantization={train.quantization} cannot train here: {'; '.join(reasons)}. {fix}, "
                      "or set -o train.base_quantization=null to train on the unquantised base",
                      ("train.base_quantization",))


def quantized_load_kwargs(quantization: str, device) -> dict[str, Any]:
    """from_pretrained's arguments for a base whose linear layers bitsandbytes quantises on CUDA `device`:
    nf4 (double-quantised NF4, bf16 compute) or int8 (LLM.int8). What it leaves alone (embeddings,
    norms) is loaded in bf16, the precision training computes in under autocast."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                    bnb_4bit_use_double_quant=True)
    elif quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
        quiet_int8_casts()
    else:
        raise ModelError(f"unknown base quantization {quantization!r}; use nf4 or int8")
    device = torch.device(device)
    if device.type != "cuda":
        raise ModelError(f"a {quantization} base loads on a CUDA device, not {device} ({NEEDS_CUDA})")
    # Placed by transformers as it quantises, weight by weight: the unquantised base never sits on the GPU whole.
    index = device.index if device.index is not None else torch.cuda.current_device()
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {"quantization_config": config, dtype_key: torch.bfloat16, "device_map": {"": index}}


class _Int8Casts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def quiet_int8_casts() -> None:
    """Silence bitsandbytes' LLM.int8 notice that bf16 inputs are cast to fp16: it is logged at every
    call of every layer (thousands of lines a step), and says what docs/performance.md says once."""
    target = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8Casts) for f in target.filters):
        target.addFilter(_Int8Casts())


def is_quantized(module) -> bool:
    """Whether `module` holds weights bitsandbytes quantised (a base loaded with quantized_load_kwargs)."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in module.parameters())


def trained_quantization(adapter_meta: dict) -> str | None:
    """The train.base_quantization an adapter was trained with (its embedft_meta.json), nf4, int8 or None."""
    value = (((adapter_meta.get("config") or {}).get("train")) or {}).get("base_quantization")
    return None if value in (None, "none") else str(value)
