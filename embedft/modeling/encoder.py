"""The Encoder: text -> token ids -> padded batches -> pooled, normalised vectors.

`load_encoder` loads a base model as an Encoder with its family's pooling, padding and
prompts; `build_encoder` is the one builder the recipes, benchmarks and tests use to get a
(trainable) encoder: base loaded, frozen weights cast, LoRA attached.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from embedft import distributed
from embedft.config import LoraConfig, ModelConfig
from embedft.errors import ModelError
from embedft.modeling import chunking
from embedft.modeling.families import DEFAULT_DECODER_INSTRUCTION, detect_family, resolve_model_path
from embedft.modeling.quantization import quantized_load_kwargs
from embedft.modeling.runtime import (bound_onednn_cache, lora_input_casts, same_kernels_on_recompute,
                                     sdpa_backends)
from embedft.modeling.tokenizer import _plain_settings, _rust_tokenizer, ensure_eos_appended

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides how text becomes a vector; saved next to adapters and exports."""

    base_model: str  # as configured (alias, folder or hub id)
    model_path: str
    model_type: str
    family: str
    pooling: str
    normalize: bool
    padding_side: str
    query_template: str | None  # "...{text}" applied to queries only
    max_length: int
    hidden_size: int
    fingerprint: str  # identifies the base weights: adapters and indexes are checked against it

    def to_json(self) -> dict:
        return asdict(self)


def _fingerprint(backbone: nn.Module, model_type: str) -> str:
    """A cheap digest of the base model's shape and a few weights (stable across loads)."""
    h = hashlib.sha256(model_type.encode())
    params = list(backbone.named_parameters())
    for name, p in params[:3] + params[-3:]:
        t = p.detach().float().flatten()[:256].cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(np.round(t, 5).tobytes())
    return h.hexdigest()[:16]


def _st_pooling(st) -> str | None:
    for module in st:
        mode = getattr(module, "pooling_mode", None)
        if isinstance(mode, str):
            return {"mean": "mean", "cls": "cls", "lasttoken": "lasttoken"}.get(mode, mode)
        if mode is not None and hasattr(module, "get_config_dict"):
            return str(module.get_config_dict().get("pooling_mode"))
    return None


# Up to this padded length x head dim, bf16 CPU training takes the math attention kernel. On cpu-2
# (benchmarks/bench_cpu_attention.py, forward+backward, math / flash time): MiniLM's 32-dim heads
# 0.10-0.72 up to 128 tokens; Qwen3's 128-dim heads 0.32 at 16 tokens, 0.99 at 64, 1.55 at 128.
CPU_MATH_ATTENTION_MAX = 8192


class Encoder(nn.Module):
    """Text -> normalised embedding, the way the model family wants it."""

    def __init__(self, st, spec: EncoderSpec):
        super().__init__()
        self.st = st  # kept for export: its modules are saved with merged weights
        self.backbone = st[0].auto_model
        self.tokenizer = st[0].tokenizer
        self.spec = spec
        cfg = self.backbone.config
        # An encoder never generates: without use_cache=False a decoder (Qwen3) builds a KV cache on
        # every forward, copying K and V per layer, and under train.compile the cache's per-layer
        # state made each layer a recompile, so past torch's limit of 8 the rest ran eager (H200).
        self.backbone_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(
            self.backbone.forward).parameters else {}
        heads = getattr(cfg, "num_attention_heads", None)
        self.head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) // heads if heads else 0) or 64

    # -- text -> ids ------------------------------------------------------------------
    def format(self, texts: Sequence[str], is_query: bool) -> list[str]:
        """Apply the query instruction to queries only."""
        tpl = self.spec.query_template
        if not is_query or not tpl:
            return list(texts)
        return [tpl.replace("{text}", t) for t in texts]

    def tokenize(self, texts: Sequence[str], is_query: bool = False) -> list[list[int]]:
        """Token ids per text, truncated, no padding (the family's special tokens included)."""
        texts = self.format(texts, is_query)
        rust = _rust_tokenizer(self.tokenizer)
        if rust is None:
            enc = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length, padding=False,
                                 return_attention_mask=False)
            return enc["input_ids"]
        # The same ids as the call above, without building a Python dict per text: a third of the
        # host's time to tokenize 35k titles (docs/benchmarks.md), which a GPU encode waits for.
        with _plain_settings(rust, self.tokenizer, self.spec.max_length):
            encode = getattr(rust, "encode_batch_fast", rust.encode_batch)  # no offsets (tokenizers >= 0.21)
            return [e.ids for e in encode(texts, add_special_tokens=True)]

    def collate(self, ids: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Pad to this batch's longest sequence, on the family's padding side."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        longest = int(lengths.max())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # One vectorised fill instead of a tensor per row: on a GPU encode of small models the
        # host's per-batch work is what the device waits for.
        start = longest - lengths if self.spec.padding_side == "left" else np.zeros_like(lengths)
        cols = np.arange(longest)
        filled = (cols >= start[:, None]) & (cols < (start + lengths)[:, None])  # (B, L), row-major = ids' order
        input_ids = np.full((len(ids), longest), pad, dtype=np.int64)
        input_ids[filled] = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        input_ids, mask = torch.from_numpy(input_ids), torch.from_numpy(filled.astype(np.int64))
        if torch.device(device).type == "cuda":  # pinned host memory: the copy overlaps with compute
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        return {"input_ids": input_ids.to(device, non_blocking=True), "attention_mask": mask.to(device, non_blocking=True)}

    # -- ids -> vectors ---------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, D) embeddings."""
        # By training mode, not grad mode: the cached negatives' pass without graph takes the kernel
        # of the pass with graph, so both give the same embeddings.
        cpu_math = (self.training and input_ids.device.type == "cpu"
                    and input_ids.shape[1] * self.head_dim <= CPU_MATH_ATTENTION_MAX and (
                        (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
                        or self.backbone.get_input_embeddings().weight.dtype == torch.bfloat16))
        with sdpa_backends(input_ids.device, self.spec.padding_side, cpu_math):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   **self.backbone_kwargs).last_hidden_state  # (B, L, H)
        emb = pool(hidden, attention_mask, self.spec.pooling)
        return nn.functional.normalize(emb.float(), dim=-1) if self.spec.normalize else emb.float()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], is_query: bool = False, batch_size: int = 128,
               progress: bool = False, device: torch.device | str | None = None,
               amp: bool | None = None) -> np.ndarray:
        """Embed texts in length-sorted batches; returns (N, D) float32 in input order."""
        device = device or next(self.backbone.parameters()).device
        ids = self.tokenize(texts, is_query)
        return self.encode_ids(ids, batch_size=batch_size, progress=progress, device=device, amp=amp)

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 128, progress: bool = False,
                   device: torch.device | str = "cpu", amp: bool | None = None) -> np.ndarray:
        """Embed pre-tokenized texts (tokenize once, encode many times).

        Batches cut from the length-sorted texts where padding waste is least, none with more
        padded tokens than batch_size rows of the longest text (`forward_chunks`). `amp`: bf16
        autocast (None: on CUDA only).
        """
        # Identical token sequences (repeated titles) are embedded once.
        keys, inverse = chunking.distinct(map(tuple, ids))
        unique: Sequence[Sequence[int]] = keys if len(keys) < len(ids) else ids
        # Under torchrun every rank calls this with the same ids and embeds its share of them.
        share = distributed.balanced_shard([len(x) for x in unique]) if distributed.current().enabled else None
        part = unique if share is None else [unique[i] for i in share.mine.tolist()]
        chunks = chunking.forward_chunks([len(x) for x in part], batch_size, device)
        out = np.empty((len(part), self.spec.hidden_size), dtype=np.float32)
        use_amp = torch.device(device).type == "cuda" if amp is None else amp
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="encode", unit="batch", leave=False)
        was_training = self.training
        self.eval()
        gather = _Gather(out, torch.device(device))
        try:
            with lora_input_casts(self, enabled=not use_amp):
                for idx in chunks:
                    batch = self.collate([part[i] for i in idx], device)
                    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_amp):
                        gather.put(idx, self(**batch))
            gather.close()
        finally:
            self.train(was_training)
        if share is not None:
            out = share.assemble(out)
        return out if unique is ids else out[inverse]


# Batches a CUDA encode may run ahead of the copies of its vectors to the host.
ENCODE_QUEUE_DEPTH = 4


class _Gather:
    """(B, D) embeddings on the device -> rows `idx` of a host array.

    On CUDA each batch's vectors are copied into pinned memory without waiting, and collected
    `depth` batches later: the host tokenizes, pads and launches the next batches while the
    device computes (waiting for each copy, as `.cpu()` does, idles the device through all of
    that host work). Elsewhere each batch is copied and written at once.
    """

    def __init__(self, out: np.ndarray, device: torch.device, depth: int = ENCODE_QUEUE_DEPTH):
        self.out, self.cuda, self.depth = out, device.type == "cuda", depth
        self.pending: collections.deque = collections.deque()

    def put(self, idx: np.ndarray, emb: torch.Tensor) -> None:
        emb = emb.float()
        if not self.cuda:  # CPU, or another accelerator (MPS, XPU): copy and wait, as before
            self.out[idx] = emb.cpu().numpy()
            return
        host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
        host.copy_(emb, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(emb.device))
        self.pending.append((idx, host, copied))
        while len(self.pending) > self.depth:
            self._land()

    def close(self) -> None:
        """Wait for the copies still queued and write their rows."""
        while self.pending:
            self._land()

    def _land(self) -> None:
        idx, host, copied = self.pending.popleft()
        copied.synchronize()
        self.out[idx] = host.numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, L, H) token states + (B, L) mask -> (B, H) by mean, cls or last-token pooling."""
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        # Index of the last real token; right for left padding (L-1) and for right padding.
        L = mask.shape[1]
        last = L - 1 - mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ModelError(f"unknown pooling {mode!r}; use mean, cls or lasttoken")


def load_encoder(cfg: ModelConfig, device: str | torch.device = "cpu", lora: LoraConfig | None = None,
                 quantization: str | None = None) -> Encoder:
    """Load the base model as an Encoder with the family's pooling, padding and prompts.

    `quantization` (nf4, int8: train.base_quantization) loads its linear layers quantised by
    bitsandbytes, on a CUDA `device`, for training only. Its spec's fingerprint is then that of the
    quantised weights: an adapter must be saved with the unquantised base's spec (`builders.load_quantized`).
    """
    from sentence_transformers import SentenceTransformer

    bound_onednn_cache()
    path = resolve_model_path(cfg.name)
    # A quantised base is placed by transformers (device_map) as bitsandbytes quantises it: not moved after.
    placement = {"device": str(device)} if quantization is None else {
        "model_kwargs": quantized_load_kwargs(quantization, device)}
    try:
        st = SentenceTransformer(path, trust_remote_code=cfg.trust_remote_code, **placement)
    except OSError as e:
        raise ModelError(f"could not load model {cfg.name!r} ({path}): {e}. Offline? Use a local folder "
                         f"or the alias 'minilm'") from e
    except Exception as e:  # a folder without config.json (ValueError), truncated weights (SafetensorError), ...
        raise ModelError(f"model.name={cfg.name!r} ({path}) is not a model transformers can load "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); give a Hugging Face or "
                         "sentence-transformers model folder (config.json and weights), a hub id or the alias "
                         "'minilm'") from e
    tok = st[0].tokenizer
    if len(tok) <= len(set(tok.all_special_ids)):
        # transformers builds an empty tokenizer when the folder has no tokenizer files: every text would
        # tokenize to [UNK] and embed the same.
        raise ModelError(f"model.name={cfg.name!r} ({path}): its tokenizer has no vocabulary besides its "
                         f"{len(tok)} special tokens (no tokenizer files in the folder?); save the tokenizer "
                         "next to the model (tokenizer.save_pretrained(folder))")
    backbone = st[0].auto_model
    model_type = getattr(backbone.config, "model_type", "unknown")
    fam = detect_family(model_type, backbone, cfg, lora)
    tok.padding_side = fam.padding_side
    if fam.name == "decoder":
        ensure_eos_appended(tok)
    has_st_config = (Path(path) / "modules.json").is_file() if Path(path).is_dir() else True
    if cfg.pooling != "auto":
        pooling = cfg.pooling
    elif has_st_config and _st_pooling(st):
        pooling = _st_pooling(st)
    else:
        pooling = fam.default_pooling
    template = cfg.query_instruction
    if template is None and fam.name == "decoder":
        template = DEFAULT_DECODER_INSTRUCTION
    if template is None and (st.prompts or {}).get("query"):
        template = st.prompts["query"] + "{text}"
    if template is not None:
        template = template.replace("{task}", cfg.task)
    if cfg.gradient_checkpointing:
        checkpoint_kwargs = {"use_reentrant": False, "context_fn": same_kernels_on_recompute}
        # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns).
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    spec = EncoderSpec(base_model=cfg.name, model_path=path, model_type=model_type, family=fam.name,
                       pooling=pooling, normalize=cfg.normalize, padding_side=fam.padding_side,
                       query_template=template, max_length=min(cfg.max_length, _max_positions(backbone)),
                       hidden_size=int(backbone.config.hidden_size), fingerprint=_fingerprint(backbone, model_type))
    encoder = Encoder(st, spec)
    return encoder if quantization is not None else encoder.to(device)


def _max_positions(backbone: nn.Module) -> int:
    return int(getattr(backbone.config, "max_position_embeddings", 10**6) or 10**6)


def compile_layers(encoder: Encoder) -> int:
    """torch.compile each transformer layer in place; returns how many.

    Each layer becomes a fused kernel graph (norms, rotary, activations, LoRA adds and dtype
    casts around the matmuls) with dynamic sequence lengths; the code around the layers (masks,
    pooling, loss) stays eager. Parameter names and state dicts are unchanged.
    """
    lists = [m for m in encoder.backbone.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelError(f"{encoder.spec.base_model}: no list of layers found to compile; set train.compile=false")
    layers = max(lists, key=len)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
