"""The training loop: LoRA parameters only, InfoNCE, warmup + decay, checkpoints.

Read `train()` top to bottom: setup, (resume), epoch loop -> step -> log (-> checkpoint every
train.checkpoint_every steps), validate, checkpoint. The batch order is a pure function of
(seed, epoch), and the checkpoint holds the optimizer, scheduler and RNG state, so a killed
run resumes exactly, mid-epoch too (`embedft.checkpoint`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from embedft.batches import Batch, PairSource, check_schedule, epoch_batches, group_keys
from embedft.checkpoint import check_resumable, load_checkpoint, run_identity, save_checkpoint
from embedft.config import GROUP_SAMPLINGS, LossConfig, TrainConfig
from embedft.losses import false_negative_mask, group_info_nce, info_nce, label_contrastive
from embedft.chunking import call_overhead, length_chunks
from embedft.models import Encoder, compile_layers
from embedft.lora import lora_input_casts, lora_settings

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class _NoSink:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


@dataclass
class ValSet:
    """Per-epoch validation: retrieval queries/corpus (token ids) and a few fixed loss batches."""

    query_ids: list[list[int]]
    corpus_ids: list[list[int]]
    positives: list[np.ndarray]  # per query: corpus indices
    self_ids: np.ndarray | None  # per query: its own corpus index (excluded), or None
    loss_source: PairSource | None = None
    loss_batches: int = 4


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)  # per logged step
    val_history: list[dict[str, float]] = field(default_factory=list)  # per epoch
    train_seconds: float = 0.0
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0


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


def uses_amp(encoder: Encoder, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: on CUDA, and on the CPU when the base weights
    are bf16 (there the fp32 LoRA layers would otherwise compute on fp32 copies of their bf16
    inputs, and keep those copies for the backward)."""
    return device.type == "cuda" or any(p.dtype == torch.bfloat16 for p in encoder.parameters())


@contextlib.contextmanager
def base_dropout(encoder: Encoder, enabled: bool):
    """With enabled=False, the base model's dropout layers drop nothing while the block runs (p=0,
    which also lets attention take its fused kernel: Hugging Face passes the attention dropout
    layer's p to SDPA); the LoRA layers' own dropout stays. Each layer's p is put back afterwards."""
    layers = [] if enabled else [m for name, m in encoder.named_modules()
                                 if isinstance(m, torch.nn.Dropout) and "lora_" not in name and m.p > 0]
    saved = [m.p for m in layers]
    try:
        for m in layers:
            m.p = 0.0
        yield len(layers)
    finally:
        for m, p in zip(layers, saved):
            m.p = p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Token cache: every text is tokenized once, in query form and in document form.


class TokenCache:
    """Token ids of a PairSource's texts, as queries (with instruction) and as documents.

    A text is tokenized the first time a batch needs it (one tokenizer call per batch for the
    new ones), then kept: a run shorter than an epoch tokenizes only the texts it trains on.
    """

    def __init__(self, encoder: Encoder, texts: Sequence[str]):
        self.encoder, self.texts = encoder, texts
        self.two_forms = bool(encoder.spec.query_template)  # else a query is its document form
        self._docs: list[list[int] | None] = [None] * len(texts)
        self._queries = [None] * len(texts) if self.two_forms else self._docs

    def docs(self, idx: Iterable[int]) -> list[list[int]]:
        """Document-form ids of texts idx."""
        return self._get(self._docs, idx, is_query=False)

    def queries(self, idx: Iterable[int]) -> list[list[int]]:
        """Query-form ids of texts idx (the model's query instruction applied)."""
        return self._get(self._queries, idx, is_query=True)

    def _get(self, store: list, idx: Iterable[int], is_query: bool) -> list[list[int]]:
        idx = [int(i) for i in idx]
        new = [i for i in dict.fromkeys(idx) if store[i] is None]
        if new:
            for i, ids in zip(new, self.encoder.tokenize([self.texts[i] for i in new], is_query=is_query)):
                store[i] = ids
        return [store[i] for i in idx]


def batch_sequences(batch: Batch, cache: TokenCache) -> tuple[list[list[int]], dict[str, Any]]:
    """Unique sequences to embed for a batch, and how to gather them back.

    Duplicate texts in a batch are embedded once. Anchors use the query form. A group batch's
    texts are anchors and candidates at once: query form, then document form when it differs.
    """
    if batch.positives is None:
        u, inv = np.unique(batch.anchors, return_inverse=True)
        seqs = cache.queries(u) + (cache.docs(u) if cache.two_forms else [])
        return seqs, {"q_inv": inv, "n_q": len(u), "two_forms": cache.two_forms}
    q_unique, q_inv = np.unique(batch.anchors, return_inverse=True)
    docs = batch.positives if batch.negatives is None else np.concatenate(
        [batch.positives, batch.negatives.reshape(-1)])
    valid = docs >= 0
    d_unique, d_inv = np.unique(docs[valid], return_inverse=True)
    seqs = cache.queries(q_unique) + cache.docs(d_unique)
    return seqs, {"q_inv": q_inv, "d_inv": d_inv, "n_q": len(q_unique), "valid": valid}


# Rows per forward call with graph on CPU; on CUDA a whole batch is one call (bound memory with
# train.mini_batch_size, the cached-negatives path, instead).
CPU_FORWARD_ROWS = 128


def embed(encoder: Encoder, seqs: Sequence[Sequence[int]], device: torch.device, amp: bool,
          chunk: int | None = None) -> torch.Tensor:
    """(N, D) embeddings with graph, in length-sorted chunks of at most `chunk` rows.

    Each chunk is padded to its own longest sequence, and the cuts are placed where they
    waste least (`length_chunks`): on short product titles this does ~1.7x less work than
    fixed chunks of 64 and ~2.7x less than a random batch padded to its longest.
    """
    if chunk is None:
        chunk = len(seqs) if device.type == "cuda" else CPU_FORWARD_ROWS
    chunks = length_chunks([len(s) for s in seqs], chunk, call_overhead(device))
    order = np.concatenate(chunks)
    parts = []
    for idx in chunks:
        batch = encoder.collate([seqs[i] for i in idx], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            parts.append(encoder(**batch))
    out = torch.cat(parts)
    inv = torch.empty_like(torch.as_tensor(order))
    inv[torch.as_tensor(order)] = torch.arange(len(order))
    return out[inv.to(out.device)]


def batch_loss(emb: torch.Tensor, batch: Batch, gather: dict[str, Any], text_keys: np.ndarray,
               loss_cfg: LossConfig) -> torch.Tensor:
    """InfoNCE for a batch given the embeddings of its unique sequences (N, D)."""
    dev = emb.device
    if batch.positives is None:
        return _group_batch_loss(emb, batch, gather, loss_cfg)
    q = emb[: gather["n_q"]][torch.as_tensor(gather["q_inv"], device=dev)]  # (B, D)
    d_all = emb[gather["n_q"]:][torch.as_tensor(gather["d_inv"], device=dev)]  # (valid docs, D)
    B = len(batch.anchors)
    docs = np.concatenate([batch.positives, batch.negatives.reshape(-1)]) if batch.negatives is not None \
        else batch.positives
    valid = gather["valid"]
    d_ids = docs[valid]
    p = d_all[:B]
    n = d_all[B:] if len(d_ids) > B else None
    cand_keys = torch.as_tensor(text_keys[d_ids], device=dev)
    anchor_keys = torch.as_tensor(batch.anchor_keys, device=dev)
    anchor_ids = torch.as_tensor(batch.anchors, device=dev)
    exclude = false_negative_mask(anchor_keys, cand_keys, anchor_ids, torch.as_tensor(d_ids, device=dev))
    exclude_sym = None
    if loss_cfg.symmetric:
        pos_keys = torch.as_tensor(text_keys[batch.positives], device=dev)
        exclude_sym = false_negative_mask(pos_keys, anchor_keys, torch.as_tensor(batch.positives, device=dev), anchor_ids)
    loss = info_nce(q, p, n, temperature=loss_cfg.temperature, exclude=exclude, symmetric=loss_cfg.symmetric,
                    exclude_sym=exclude_sym)
    if loss_cfg.label_weight > 0 and batch.anchor_labels is not None:
        labels = torch.as_tensor(batch.anchor_labels, device=dev)
        loss = loss + loss_cfg.label_weight * label_contrastive(torch.cat([q, p]), torch.cat([labels, labels]),
                                                                temperature=loss_cfg.label_temperature)
    return loss


def _group_batch_loss(emb: torch.Tensor, batch: Batch, gather: dict[str, Any], loss_cfg: LossConfig) -> torch.Tensor:
    dev = emb.device
    inv = torch.as_tensor(gather["q_inv"], device=dev)
    n = gather["n_q"]
    q = emb[:n][inv]  # (B, D)
    d = emb[n:][inv] if gather["two_forms"] else q
    ids = torch.as_tensor(batch.anchors, device=dev)
    keys = torch.as_tensor(batch.anchor_keys, device=dev)
    loss = group_info_nce(q, d, keys, ids[:, None] == ids[None, :], temperature=loss_cfg.temperature)
    if loss_cfg.label_weight > 0 and batch.anchor_labels is not None:
        loss = loss + loss_cfg.label_weight * label_contrastive(d, torch.as_tensor(batch.anchor_labels, device=dev),
                                                                temperature=loss_cfg.label_temperature)
    return loss


def train_step_cached(encoder: Encoder, seqs: Sequence[Sequence[int]], loss_of, device: torch.device,
                      chunk: int, amp: bool) -> float:
    """GradCache: embed chunks without graph, loss on all, then back-propagate chunk by chunk.

    The effective batch is then bounded by the loss matrix, not by activation memory.
    Dropout is replayed exactly by restoring the RNG state of each chunk's first pass.
    """
    chunks = length_chunks([len(s) for s in seqs], chunk, call_overhead(device))
    order = np.concatenate(chunks)
    states, parts = [], []
    with torch.no_grad():
        for idx in chunks:
            states.append(_rng_state(device))
            batch = encoder.collate([seqs[i] for i in idx], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                parts.append(encoder(**batch).float())
    flat = torch.cat(parts)
    emb = torch.empty_like(flat)
    emb[torch.as_tensor(order, device=flat.device)] = flat
    emb = emb.detach().requires_grad_(True)
    loss = loss_of(emb)
    loss.backward()
    grads = emb.grad
    for idx, state in zip(chunks, states):
        _set_rng_state(state, device)
        batch = encoder.collate([seqs[i] for i in idx], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = encoder(**batch).float()
        out.backward(grads[torch.as_tensor(idx, device=grads.device)])
    return float(loss.detach())


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ---------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(encoder: Encoder, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters only."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: LoRA was not applied")
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def lr_lambda(total: int, warmup: int, kind: str):
    """Warmup then linear/cosine decay (or constant), as a multiplier of the peak lr."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


# ---------------------------------------------------------------------------------------
# Validation and hard negatives


@torch.no_grad()
def validate(encoder: Encoder, val: ValSet, text_keys_cache: tuple[PairSource, TokenCache] | None,
             loss_cfg: LossConfig, batch_size: int, device: torch.device, seed: int, k: int = 10,
             sampling: str = "random", group_size: int = 4) -> dict[str, float]:
    """Validation recall@k by exact search, and validation loss on fixed batches (drawn as the
    training batches are, random groups standing in for similar ones)."""
    from embedft.index import exact_search
    from embedft.metrics import recall_at_k

    q = encoder.encode_ids(val.query_ids, device=device)
    c = encoder.encode_ids(val.corpus_ids, device=device)
    kk = min(k, len(val.corpus_ids) - (1 if val.self_ids is not None else 0))
    _, ranked = exact_search(c, q, kk, self_ids=val.self_ids)
    out = {f"val/recall@{k}": recall_at_k(ranked, val.positives, kk)}
    if text_keys_cache is not None:
        src, cache = text_keys_cache
        losses = []
        encoder.eval()
        sampling = "groups" if sampling in GROUP_SAMPLINGS else "random"
        amp = uses_amp(encoder, device)
        with lora_input_casts(encoder, enabled=not amp):
            for i, batch in enumerate(epoch_batches(src, batch_size, seed, 0, sampling, group_size=group_size)):
                if i >= val.loss_batches:
                    break
                seqs, gather = batch_sequences(batch, cache)
                emb = embed(encoder, seqs, device, amp=amp)
                losses.append(float(batch_loss(emb, batch, gather, src.text_keys, loss_cfg)))
        encoder.train()
        if losses:
            out["val/loss"] = float(np.mean(losses))
    return out


@torch.no_grad()
def mine_hard_negatives(encoder: Encoder, src: PairSource, cache: TokenCache, n: int, device: torch.device,
                        skip_top: int = 0) -> np.ndarray:
    """(N_anchors, n) text ids of the nearest texts with a different key, by the current encoder."""
    from embedft.index import exact_search

    docs = encoder.encode_ids(cache.docs(range(len(src.texts))), device=device)
    if not cache.two_forms:  # no query instruction: an anchor's query vector is its doc vector
        queries = docs[src.anchors]
    else:
        queries = encoder.encode_ids(cache.queries(src.anchors), device=device)
    depth = min(len(docs), n + skip_top + 32)
    _, ranked = exact_search(docs, queries, depth)
    out = np.full((src.n_anchors, n), -1, dtype=np.int64)
    for i in range(src.n_anchors):
        cand = ranked[i][(ranked[i] >= 0)]
        cand = cand[(src.text_keys[cand] != src.anchor_keys[i]) & (cand != src.anchors[i])][skip_top:skip_top + n]
        out[i, : len(cand)] = cand
    return out


@torch.no_grad()
def group_neighbours(encoder: Encoder, src: PairSource, cache: TokenCache, device: torch.device,
                     m: int = 16) -> np.ndarray:
    """(n_groups, m) each training group's nearest other groups (positions into the sorted group
    keys, nearest first, -1 padded) by the cosine of their mean document embeddings."""
    from embedft.index import exact_search

    keys = group_keys(src)  # the order group_batches indexes neighbours by
    texts = np.concatenate([src.members[int(k)] for k in keys.tolist()])
    owner = np.repeat(np.arange(len(keys)), [len(src.members[int(k)]) for k in keys.tolist()])
    emb = encoder.encode_ids(cache.docs(texts), device=device)  # (T, D)
    cent = np.zeros((len(keys), emb.shape[1]), dtype=np.float32)
    np.add.at(cent, owner, emb)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    out = np.full((len(keys), m), -1, dtype=np.int64)
    depth = min(len(keys) - 1, m)
    if depth >= 1:
        _, ranked = exact_search(cent, cent, depth, self_ids=np.arange(len(keys)))
        out[:, :depth] = ranked
    return out


# ---------------------------------------------------------------------------------------
# The loop


def train(encoder: Encoder, src: PairSource, cfg: TrainConfig, loss_cfg: LossConfig, out_dir: str | Path, *,
          val: ValSet | None = None, sink: MetricSink | None = None, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train the encoder's LoRA parameters on src; checkpoints go to out_dir/checkpoint."""
    sink = sink or _NoSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(encoder.parameters()).device
    amp = uses_amp(encoder, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    n_total = check_schedule(src, cfg)
    ckpt = out / "checkpoint"
    identity = run_identity(encoder.spec, lora_settings(encoder), src, cfg, loss_cfg)
    if resume:
        check_resumable(ckpt, identity)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * n_total)
    if cfg.compile:
        log.info("compiling %d layers (torch.compile)", compile_layers(encoder))
    opt = make_optimizer(encoder, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(n_total, warmup, cfg.scheduler))
    cache = TokenCache(encoder, src.texts)
    val_cache = None
    if val is not None and val.loss_source is not None:
        val_cache = (val.loss_source, TokenCache(encoder, val.loss_source.texts))

    # Mined before any resume, from the starting weights, so a resumed run sees the same negatives.
    mined = None
    if loss_cfg.hard_negatives > 0 and src.negatives is None:
        log.info("mining %d hard negatives per anchor with the starting encoder", loss_cfg.hard_negatives)
        state = torch.get_rng_state()
        mined = mine_hard_negatives(encoder, src, cache, loss_cfg.hard_negatives, device)
        torch.set_rng_state(state)
    neighbours = None
    if cfg.batch_sampling == "similar_groups":
        log.info("finding each group's nearest groups with the starting encoder")
        state = torch.get_rng_state()
        neighbours = group_neighbours(encoder, src, cache, device)
        torch.set_rng_state(state)

    result = TrainResult(steps=0, epochs_done=0)
    start_epoch, step, skip = 0, 0, 0
    if resume:
        start_epoch, step, skip = load_checkpoint(ckpt, encoder, opt, sched, result)
        result.epochs_done = start_epoch
        log.info("resumed from %s at step %d (epoch %d, after %d of its batches)", ckpt, step, start_epoch + 1, skip)

    encoder.train()
    seen, tokens, t_train = 0, 0, 0.0
    # The bar is closed however the loop ends (a NaN loss, Ctrl-C), so the error line starts on a
    # line of its own; the base model's dropout is put back however it ends, too.
    with tqdm(total=n_total, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not progress) as bar, \
            base_dropout(encoder, cfg.base_dropout) as n_off:
        if n_off:
            log.info("train.base_dropout=false: %d dropout layers of the base model off (LoRA dropout stays)", n_off)
        for epoch in range(start_epoch, cfg.epochs):
            if step >= n_total:
                break
            batches = epoch_batches(src, cfg.batch_size, cfg.seed, epoch, cfg.batch_sampling,
                                    loss_cfg.hard_negatives, mined, cfg.group_size, neighbours)
            # An epoch's batches are a pure function of (seed, epoch): a run resumed from a
            # mid-epoch checkpoint skips the ones done and goes on with the same next batch.
            skip = skip if epoch == start_epoch else 0
            for i, batch in enumerate(itertools.islice(batches, skip, None), start=skip):
                if step >= n_total:
                    break
                t0 = time.perf_counter()
                seqs, gather = batch_sequences(batch, cache)
                loss_of = lambda emb: batch_loss(emb, batch, gather, src.text_keys, loss_cfg)  # noqa: E731
                with lora_input_casts(encoder, enabled=not amp):  # forward and backward alike
                    if cfg.mini_batch_size:
                        loss = train_step_cached(encoder, seqs, loss_of, device, cfg.mini_batch_size, amp)
                    else:
                        emb = embed(encoder, seqs, device, amp=amp)
                        loss_t = loss_of(emb)
                        loss_t.backward()
                        loss = float(loss_t.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in encoder.parameters() if p.requires_grad],
                                                           cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                t_train += dt
                seen += len(batch.anchors)
                tokens += sum(len(s) for s in seqs)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower train.lr "
                                             f"(now {cfg.lr}) or raise loss.temperature")
                if progress:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                    sps=f"{seen / max(t_train, 1e-9):.1f}")
                if step % cfg.log_every == 0 or step == n_total:
                    rec = {"train/loss": loss, "train/lr": float(sched.get_last_lr()[0]),
                           "train/samples_per_s": len(batch.anchors) / dt, "train/grad_norm": float(grad_norm)}
                    result.history.append({"step": step, **rec})
                    sink.log_metrics(rec, step=step)
                    if not progress:
                        log.info("step %d/%d loss=%.4f lr=%.2e samples/s=%.1f", step, n_total, loss,
                                 rec["train/lr"], seen / max(t_train, 1e-9))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < n_total:
                    save_checkpoint(ckpt, encoder, opt, sched, epoch, step, result, identity, batches_done=i + 1)
            epoch_done = epoch + 1
            if val is not None and cfg.eval_every_epoch:
                metrics = validate(encoder, val, val_cache, loss_cfg, cfg.batch_size, device, cfg.seed,
                                   sampling=cfg.batch_sampling, group_size=cfg.group_size)
                result.val_history.append({"epoch": epoch_done, "step": step, **metrics})
                sink.log_metrics({**metrics, "epoch": float(epoch_done)}, step=step)
                log.info("epoch %d: %s", epoch_done, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            save_checkpoint(ckpt, encoder, opt, sched, epoch_done, step, result, identity)
            result.epochs_done = epoch_done
    result.steps = step
    result.train_seconds = t_train
    result.samples_per_s = seen / t_train if t_train else 0.0
    result.tokens_per_s = tokens / t_train if t_train else 0.0
    return result
