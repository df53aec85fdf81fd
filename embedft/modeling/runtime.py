"""Runtime: device, seeds, precision and attention kernels for the forward passes.

Nothing here knows a model family: the Encoder and the training loop call these to pick a
device, the frozen base's dtype, autocast, the SDPA kernel and the oneDNN cache bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from embedft.config import DEVICES, is_device
from embedft.errors import ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def lora_input_casts(module: nn.Module, enabled: bool):
    """Whether peft's LoRA layers copy their input to the adapter's dtype (fp32) first.

    Under bf16 autocast the copy is wasted: autocast casts the input back to bf16 for the
    adapter's matmul, so skipping it gives the same values (bit for bit without LoRA dropout,
    tests/test_models.py; with dropout the same masks, the 1/(1-p) scaling then rounded in bf16
    instead of fp32) and saves two (tokens x hidden) copies per adapted projection in the
    forward and two in the backward.
    Use `enabled=False` around everything that runs under autocast, backward included
    (gradient checkpointing recomputes the forward there, and must take the same path).
    """
    layers = [m for m in module.modules() if hasattr(m, "cast_input_dtype_enabled")] if not enabled else []
    saved = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.cast_input_dtype_enabled = value


def sdpa_backends(device: torch.device, padding_side: str, cpu_math: bool = False):
    """Attention kernels for a forward call.

    - CUDA with left padding: not cuDNN's. Left-padded causal attention has fully masked query
      rows (the pads); flash, memory-efficient and math SDPA are documented to give those rows
      zeros. On an H100 (torch 2.11) a Qwen3-shaped LoRA run with the default kernel choice
      (cuDNN) hit a NaN loss at step 2 and trained without it; a one-batch gradient probe did not
      reproduce the NaN, so cuDNN is the likely, not the proven, cause (docs/benchmarks.md).
    - CPU with `cpu_math` (bf16 training on short sequences; `Encoder.forward` decides): the math
      kernel. PyTorch's CPU flash kernel is the faster one forward, but its bf16 backward costs
      tens of ms a call at any length: up to 10x the math kernel's on short sequences on cpu-2 (in
      fp32 flash is faster both ways; `benchmarks/bench_cpu_attention.py`). Training takes the
      flash kernel where attention has no dropout: models without it (Qwen3), `train.base_dropout=false`.
    """
    cpu_math = cpu_math and device.type == "cpu"
    if not cpu_math and (device.type != "cuda" or padding_side != "left"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if cpu_math:
        return sdpa_kernel([SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def same_kernels_on_recompute():
    """torch.utils.checkpoint's `context_fn` for checkpointed layers (model.gradient_checkpointing).

    A layer's recompute runs in the backward, outside the `sdpa_backends` block of its forward, so
    it is given the attention kernels enabled at that forward. With torch's default choice there,
    a bf16 CPU step (the math kernel forward, flash again in the recompute) saves other tensors
    and fails with a CheckpointError, and a left-padded CUDA batch may recompute with cuDNN's kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = torch.backends.cuda  # sdpa_kernel's switches, for the CPU's kernels too
    enabled = [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
                                           (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
                                           (SDPBackend.MATH, flags.math_sdp_enabled()),
                                           (SDPBackend.CUDNN_ATTENTION, flags.cudnn_sdp_enabled())) if on]
    return contextlib.nullcontext(), sdpa_kernel(enabled)


# oneDNN (PyTorch's CPU bf16 matmuls) caches a compiled primitive, scratch memory included, for
# every distinct input shape, up to 1,024 of them. Length-sorted chunks give many shapes, so on a
# bf16 CPU run the cache alone held about 430 MB after 30 steps; 64 entries still cover the
# shapes one step reuses, at the same speed (docs/benchmarks.md). A value the user set wins.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "64"


def bound_onednn_cache() -> None:
    """Cap oneDNN's primitive cache, unless $ONEDNN_PRIMITIVE_CACHE_CAPACITY is set. oneDNN reads
    the variable when it builds its first primitive, so call this before the first forward."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """auto -> cuda when available, else cpu. `option` is the setting errors name: a config key
    (train.device, set with -o) or a command-line option (--device)."""
    flag = option.startswith("--")
    given = f"{option} {name}" if flag else f"{option}={name}"

    def use(value: str) -> str:
        return f"use {option} {value}" if flag else f"use -o {option}={value}"

    if not is_device(name):
        raise ConfigError(f"{given}: unknown device; {use('auto')}, or one of {DEVICES}", (option,))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{given} but no CUDA device is available; {use('auto')}", (option,))
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{given} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(numbered from 0); {use('cuda')}", (option,))
    return device




@contextlib.contextmanager
def encode_precision(module: nn.Module, precision: str):
    """Encoding at `eval.precision`; yields the `amp` argument for `Encoder.encode`.

    auto: bf16 autocast on CUDA, fp32 on CPU. fp32: no autocast anywhere. bf16: every floating
    parameter (LoRA weights too) is swapped for a bf16 copy while the block runs, under autocast
    on CUDA; the original tensors are put back afterwards, untouched, so training or an export
    after it sees the same weights.
    """
    if precision == "fp32":
        yield False
        return
    if precision != "bf16":
        yield None
        return
    params = [p for p in module.parameters() if p.is_floating_point() and p.dtype != torch.bfloat16]
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        yield None
    finally:
        for p, data in zip(params, originals):
            p.data = data


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 on this CPU (read from /proc/cpuinfo, so Linux only). With them a
    bf16 matmul is faster than an fp32 one; without them it is emulated and slower."""
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def base_dtype(setting: str, device: torch.device) -> torch.dtype:
    """train.base_dtype resolved: bf16 when asked, or for `auto` on CUDA and on CPUs with native
    bf16 (the LoRA weights and optimizer state stay fp32 either way)."""
    if setting == "bf16" or (setting == "auto" and (device.type == "cuda" or
                                                    (device.type == "cpu" and cpu_has_native_bf16()))):
        return torch.bfloat16
    return torch.float32


def uses_amp(encoder: nn.Module, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: on CUDA, and on the CPU when the base weights
    are bf16 (there the fp32 LoRA layers would otherwise compute on fp32 copies of their bf16
    inputs, and keep those copies for the backward)."""
    return device.type == "cuda" or any(p.dtype == torch.bfloat16 for p in encoder.parameters())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
