"""LoRA contrastive training: sentence-transformers' Trainer vs embedft's train(), same everything.

    python benchmarks/bench_train.py [--model minilm] [--steps 200] [--batch-size 64] [--max-length 64]
                                     [--lr 5e-4] [--warmup-steps 10] [--r 16] [--alpha 32] [--dropout 0.05]
                                     [--limit-queries 2000] [--seed 42] [--threads N] [--sides st,embedft]
                                     [--embedft-compile true] [--embedft-base-dtype bf16]
                                     [--embedft-base-dropout false]

Both sides train the same base model with the same LoRA (the family's Q/K/V, same r, alpha,
dropout), batch size, max length, steps, lr, linear warmup + decay, weight decay, grad clip
and seed, on the SAME (anchor, positive) pairs in the SAME order:

- the pairs are the first steps * batch_size ones that embedft's `epoch_batches(src, B, seed,
  epoch)` yields (epoch 0, then 1, ... if the run is longer than an epoch). embedft's train()
  draws exactly these; sentence-transformers gets them as a `datasets.Dataset` in that order,
  read by a sequential batch sampler (no shuffling, no NO_DUPLICATES reordering), so batch i
  is the same on both sides. Each side prints a digest of its pairs; the parent checks they match.
- sentence-transformers: `peft.inject_adapter_in_model(peft.LoraConfig(...), model[0].auto_model)`,
  what `SentenceTransformer.add_adapter` hands over to through transformers' PeftAdapterMixin (LoRA
  layers injected in place; only they train). It is called directly because transformers >= 5.24
  refuses `add_adapter` with peft < 0.22, and no peft 0.22 has been released yet;
  `MultipleNegativesRankingLoss` (scale 20 = temperature 0.05) and `SentenceTransformerTrainer`.
- embedft: `apply_lora` + `train()` with InfoNCE at temperature 0.05, one direction.

Data: the PriceRunner offers in ../shared/datasets/pricerunner when present (title = col 1,
product = cluster_id col 3, train = cluster_id % 5 != 0, held-out = the rest), else the sample
data/products.csv (text / product_id, same modulo split). `--data` forces one: `pricerunner`,
`sample`, or the path of a CSV in PriceRunner's layout (pricerunner_aggregate.csv elsewhere,
e.g. from a worktree that has no ../shared beside it).

Measured per side, each in its own subprocess (RSS high-water marks are per process):
wall time of the training call (`trainer.train()` / `train()`, model load and data preparation
excluded, nothing subtracted), samples/s and tokens/s over it (tokens of anchor + positive,
truncated at max_length, counted once with the model's tokenizer), step-only time (ST: sum of
on_step_begin -> on_step_end, which excludes its per-batch tokenisation; embedft: its own sum of
step times, which includes padding and tokenising the batch's new texts), peak RSS (process, and sampled during training only), on
CUDA the peak allocated memory, the final training loss (mean of the last 10 steps), and
validation recall@10 and R_cap@10 by exact search on up to --limit-queries held-out queries against all
held-out offers minus the query itself, both embedded with the model's pooling and L2-normalised.

Known differences that stay: embedft never uses a text of the anchor's own product as an
in-batch negative (MNRL does; `same_product_pairs_per_batch` says how often that happens) and
embeds duplicate texts of a batch once; HF's linear warmup gives lr 0 at the first step where
embedft gives lr/warmup (a one-step shift); HF's default AdamW is fused, embedft's is foreach.
Decoder embedders (Qwen3) train without their query prompt here, as ST's trainer does: both sides
embed anchors and positives as plain offers.

Timings need an otherwise idle machine: with another job on the cores, both sides' OpenMP
threads stall unpredictably (3-step smoke runs next to a training job swung from 0.6x to 4.7x).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_encode import data_csv  # noqa: E402  (the --data choice, shared with bench_encode)

SAMPLE = REPO / "data" / "products.csv"
SIDES = ("st", "embedft")
SIDE_NAMES = {"st": "sentence-transformers", "embedft": "embedft"}
TEMPERATURE = 0.05  # MNRL's default scale 20 is 1 / 0.05
LOSS_WINDOW = 10  # final loss = mean of the last this many steps
K = 10


@dataclass(frozen=True)
class BenchSettings:
    """What both sides share; the CLI flags are these fields (defaults live here only)."""

    model: str = "minilm"
    steps: int = 200
    batch_size: int = 64
    max_length: int = 64
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01  # embedft's TrainConfig default; HF's is 0, so it is passed explicitly
    max_grad_norm: float = 1.0
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    limit_queries: int = 2000
    seed: int = 42
    threads: int | None = None  # torch CPU threads for both sides; None = torch's default
    data: str = "auto"  # auto | pricerunner | sample | path of a CSV in PriceRunner's layout
    device: str = "auto"  # auto | cpu | cuda
    embedft_compile: bool = False  # embedft side only: train.compile (torch.compile of each layer)
    # embedft side only: train.base_dtype. `match` (the default) = ST's precision: bf16 on CUDA (ST runs
    # with bf16=True there), fp32 on CPU; or fp32, bf16, auto (the pipeline's: bf16 on CPUs with native bf16).
    embedft_base_dtype: str = "match"
    # embedft side only: train.base_dropout. true (the default) = as ST trains, with the base model's dropout.
    embedft_base_dropout: bool = True


@dataclass(frozen=True)
class BenchData:
    """The training pairs (in step order) and the held-out retrieval task, identical for both sides."""

    source: str
    src: Any  # embedft.data.batches.PairSource
    anchors: list[str]  # steps * batch_size, batch i = rows [i*B, (i+1)*B)
    positives: list[str]
    task: Any  # embedft.data.examples.RetrievalTask
    same_product_pairs_per_batch: float

    def digest(self) -> str:
        h = hashlib.sha256()
        for a, p in zip(self.anchors, self.positives):
            h.update(f"{a}\x1f{p}\x1e".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Data


def data_config(which: str):
    """The DataConfig of the benchmark split (PriceRunner when present, else the sample)."""
    from embedft.config import DataConfig

    path = data_csv(which)
    # Keep every row, as the pricerunner-matching experiment does: repeated titles and
    # single-offer products stay in the held-out corpus and never become anchors.
    policies = dict(on_singleton="warn", on_duplicate="warn", on_overlap="warn")
    if path is None:
        return DataConfig(train=str(SAMPLE), shape="grouped", text_column="text", group_column="product_id",
                          label_column="category", split="modulo", split_modulo=5, **policies)
    return DataConfig(train=str(path), header=False, shape="grouped", text_column=1, group_column=3,
                      label_column=6, split="modulo", split_modulo=5, **policies)


def planned_batches(src, batch_size: int, steps: int, seed: int) -> list:
    """The first `steps` batches embedft's train() draws: epoch_batches of epoch 0, 1, ..."""
    from embedft.data.batches import epoch_batches, steps_per_epoch

    if steps_per_epoch(src, batch_size) == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than the {src.n_anchors} training anchors")
    out, epoch = [], 0
    while len(out) < steps:
        for batch in epoch_batches(src, batch_size, seed, epoch):
            out.append(batch)
            if len(out) == steps:
                break
        epoch += 1
    return out


def prepare_data(s: BenchSettings) -> BenchData:
    """Split, build the pair source, materialise the planned pairs and the held-out task."""
    import numpy as np

    from embedft.data.batches import build_pair_source
    from embedft.data.examples import load_splits, retrieval_task

    cfg = data_config(s.data)
    train_ex, eval_ex, _ = load_splits(cfg)
    src = build_pair_source(train_ex)
    batches = planned_batches(src, s.batch_size, s.steps, s.seed)
    anchors = [src.texts[i] for b in batches for i in b.anchors.tolist()]
    positives = [src.texts[i] for b in batches for i in b.positives.tolist()]
    # Off-diagonal in-batch candidates of the anchor's own product: MNRL counts them as negatives.
    same = [int((b.anchor_keys[:, None] == b.anchor_keys[None, :]).sum()) - len(b.anchors) for b in batches]
    task = retrieval_task(eval_ex, max_queries=s.limit_queries, seed=s.seed)
    return BenchData(cfg.train, src, anchors, positives, task, float(np.mean(same)))


def count_tokens(tokenizer, texts: list[str], max_length: int) -> int:
    """Tokens of texts (special tokens included), truncated at max_length."""
    ids = tokenizer(texts, truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False)["input_ids"]
    return sum(len(x) for x in ids)


# ---------------------------------------------------------------------------------------
# Measurement helpers


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _maxrss_mb()


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB on Linux


class RssPeak:
    """Peak RSS while the block runs, sampled every `every` seconds by a thread (MB)."""

    def __init__(self, every: float = 0.01):
        self.every = every
        self.before = self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> "RssPeak":
        self.before = self.peak = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def recall_at_10(corpus_vecs, query_vecs, task) -> tuple[float, float]:
    """Exact-search (recall@10, R_cap@10) of the held-out task (each query's own row excluded)."""
    from embedft.evaluation.index import exact_search
    from embedft.evaluation.metrics import r_cap_at_k, recall_at_k

    k = min(K, len(task.corpus) - (1 if task.self_ids is not None else 0))
    _, ranked = exact_search(corpus_vecs, query_vecs, k, self_ids=task.self_ids)
    return recall_at_k(ranked, task.positives, k), r_cap_at_k(ranked, task.positives, k)


@dataclass
class Measurement:
    """What one side's run produced; filled in by `measured` and the side."""

    tokens: int = 0
    trainable: int = 0
    train_s: float = 0.0
    step_s: float = 0.0
    first_step_s: float = 0.0  # a compile or warm-up cost shows here
    losses: list[float] = field(default_factory=list)
    rss_before_mb: float = 0.0
    train_peak_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0  # process high-water mark at the end of training (before evaluation)
    cuda_peak_mb: float | None = None
    recall: float = float("nan")
    r_cap: float = float("nan")


@contextlib.contextmanager
def measured(m: Measurement, device):
    """Time the block (wall clock) and record its memory into m."""
    _cuda_reset(device)
    with RssPeak() as mem:
        t0 = time.perf_counter()
        yield m
        _cuda_sync(device)
        m.train_s = time.perf_counter() - t0
    m.rss_before_mb, m.train_peak_rss_mb = mem.before, mem.peak
    m.peak_rss_mb = _maxrss_mb()
    m.cuda_peak_mb = _cuda_peak(device)


def report(side: str, s: BenchSettings, data: BenchData, device, m: Measurement) -> dict[str, Any]:
    """One side's flat result row (JSON-ready)."""
    import torch

    n, last = len(data.anchors), m.losses[-LOSS_WINDOW:]
    return {
        "side": side, "model": s.model, "data": data.source, "device": str(device),
        "torch_threads": torch.get_num_threads(), "steps": len(m.losses), "batch_size": s.batch_size,
        "pairs": n, "pairs_digest": data.digest(), "tokens": m.tokens, "trainable_params": m.trainable,
        "train_s": m.train_s, "samples_per_s": n / m.train_s, "tokens_per_s": m.tokens / m.train_s,
        "step_s": m.step_s, "step_samples_per_s": n / m.step_s if m.step_s else 0.0,
        "first_step_s": m.first_step_s,
        "later_step_samples_per_s": (n - s.batch_size) / (m.step_s - m.first_step_s) if m.step_s > m.first_step_s else 0.0,
        "peak_rss_mb": m.peak_rss_mb, "train_peak_rss_mb": m.train_peak_rss_mb,
        "train_rss_increase_mb": m.train_peak_rss_mb - m.rss_before_mb, "cuda_peak_mb": m.cuda_peak_mb,
        "first_loss": m.losses[0], "final_loss": sum(last) / len(last), "recall@10": m.recall, "r_cap@10": m.r_cap,
        "queries": len(data.task), "corpus": len(data.task.corpus),
        "same_product_pairs_per_batch": data.same_product_pairs_per_batch,
    }


def _cuda_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------
# sentence-transformers side


def _st_imports():
    try:  # sentence-transformers >= 6 moved these; the old paths still work with a warning
        from sentence_transformers.base.sampler import DefaultBatchSampler
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sampler import DefaultBatchSampler
    return DefaultBatchSampler, MultipleNegativesRankingLoss


def sequential_batch_sampler(dataset, batch_size: int, drop_last: bool, valid_label_columns=None,
                             generator=None, seed: int = 0):
    """ST batch sampler that keeps the dataset's row order (ST's own samplers all shuffle)."""
    from torch.utils.data import SequentialSampler

    DefaultBatchSampler, _ = _st_imports()
    return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last,
                               valid_label_columns=valid_label_columns, generator=generator, seed=seed)


def lora_targets_for(model_type: str) -> list[str]:
    """The family's Q/K/V names, as embedft's apply_lora picks them."""
    from embedft.modeling.families import MODEL_TYPES

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} has no known Q/K/V layers in embedft.modeling.families.MODEL_TYPES")
    return list(MODEL_TYPES[model_type].targets)


def load_st_model(s: BenchSettings, device):
    """SentenceTransformer with a fresh LoRA adapter on the family's Q/K/V (only it trains)."""
    import peft
    import torch
    from sentence_transformers import SentenceTransformer

    from embedft.modeling.families import resolve_model_path

    model = SentenceTransformer(resolve_model_path(s.model), device=str(device))
    model.max_seq_length = min(s.max_length, model.max_seq_length or s.max_length)
    backbone = model[0].auto_model
    targets = lora_targets_for(backbone.config.model_type)
    torch.manual_seed(s.seed)
    # What model.add_adapter(config) runs, minus transformers' peft version gate (see the docstring).
    peft.inject_adapter_in_model(peft.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                 target_modules=targets, bias="none"), backbone, "default")
    return model


def make_step_timer(device):
    """A TrainerCallback summing on_step_begin -> on_step_end (the batch is already loaded then)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        total = 0.0
        first = None
        _t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            _cuda_sync(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _cuda_sync(device)
            dt = time.perf_counter() - self._t0
            self.total += dt
            self.first = dt if self.first is None else self.first

    return StepTimer()


def build_st_trainer(model, s: BenchSettings, data: BenchData, out_dir: str, device):
    """SentenceTransformerTrainer over the planned pairs, read in order, MNRL at scale 20."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    _, MultipleNegativesRankingLoss = _st_imports()
    dataset = Dataset.from_dict({"anchor": data.anchors, "positive": data.positives})
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, max_steps=s.steps, per_device_train_batch_size=s.batch_size, learning_rate=s.lr,
        warmup_steps=s.warmup_steps, lr_scheduler_type="linear", weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, logging_steps=1, seed=s.seed, report_to="none", save_strategy="no",
        dataloader_drop_last=True, batch_sampler=sequential_batch_sampler, disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=device.type == "cuda")
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE)
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)


def run_st(s: BenchSettings, data: BenchData) -> dict[str, Any]:
    """Train with sentence-transformers' Trainer and measure it."""
    device = _device(s.device)
    model = load_st_model(s, device)
    m = Measurement(tokens=count_tokens(model.tokenizer, data.anchors + data.positives, model.max_seq_length),
                    trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    with tempfile.TemporaryDirectory(prefix="bench-st-") as out:
        trainer = build_st_trainer(model, s, data, out, device)
        timer = make_step_timer(device)
        trainer.add_callback(timer)
        with measured(m, device):
            trainer.train()
    m.step_s, m.first_step_s = timer.total, timer.first or 0.0
    m.losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    kw = dict(batch_size=128, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    corpus = model.encode(data.task.corpus, **kw)
    queries = corpus[data.task.self_ids] if data.task.self_ids is not None else model.encode(data.task.queries, **kw)
    m.recall, m.r_cap = recall_at_10(corpus, queries, data.task)
    return report("st", s, data, device, m)


# ---------------------------------------------------------------------------------------
# embedft side


def run_embedft(s: BenchSettings, data: BenchData) -> dict[str, Any]:
    """Train with embedft's train() and measure it."""
    from embedft.config import LoraConfig, LossConfig, ModelConfig, TrainConfig
    from embedft.data.batches import steps_per_epoch
    from embedft.modeling.builders import make_trainable
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.runtime import base_dtype, seed_everything
    from embedft.training.loop import train

    device = _device(s.device)
    encoder = load_encoder(ModelConfig(name=s.model, max_length=s.max_length), device)
    # Offer matching is symmetric: anchors are offers, not queries, so no query prompt on
    # either side (ST's trainer applies none); decoders keep last-token pooling and EOS.
    encoder.spec = dataclasses.replace(encoder.spec, query_template=None)
    seed_everything(s.seed)
    setting = ("bf16" if device.type == "cuda" else "fp32") if s.embedft_base_dtype == "match" else s.embedft_base_dtype
    make_trainable(encoder, LoraConfig(r=s.r, alpha=s.alpha, dropout=s.dropout), base_dtype(setting, device))
    m = Measurement(tokens=count_tokens(encoder.tokenizer, data.anchors + data.positives, encoder.spec.max_length),
                    trainable=sum(p.numel() for p in encoder.parameters() if p.requires_grad))
    cfg = TrainConfig(epochs=math.ceil(s.steps / steps_per_epoch(data.src, s.batch_size)), max_steps=s.steps,
                      batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps,
                      scheduler="linear", max_grad_norm=s.max_grad_norm, seed=s.seed, device=str(device),
                      log_every=1, eval_every_epoch=False, threads=s.threads, compile=s.embedft_compile,
                      base_dropout=s.embedft_base_dropout)
    loss_cfg = LossConfig(temperature=TEMPERATURE, symmetric=False)
    with tempfile.TemporaryDirectory(prefix="bench-embedft-") as out:
        with measured(m, device):
            result = train(encoder, data.src, cfg, loss_cfg, out, progress=False)
    m.step_s = result.train_seconds
    m.first_step_s = s.batch_size / result.history[0]["train/samples_per_s"]
    m.losses = [h["train/loss"] for h in result.history]
    corpus = encoder.encode(data.task.corpus, batch_size=128)
    if data.task.self_ids is not None and not encoder.spec.query_template:
        queries = corpus[data.task.self_ids]
    else:
        queries = encoder.encode(data.task.queries, is_query=True, batch_size=128)
    m.recall, m.r_cap = recall_at_10(corpus, queries, data.task)
    return report("embedft", s, data, device, m)


def run_side(side: str, s: BenchSettings, data: BenchData | None = None) -> dict[str, Any]:
    """One side, in this process: prepare the data (unless given), train, measure, evaluate."""
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)
    data = data or prepare_data(s)
    if side == "st":
        return run_st(s, data)
    if side == "embedft":
        return run_embedft(s, data)
    raise ValueError(f"unknown side {side!r}; use st or embedft")


# ---------------------------------------------------------------------------------------
# Parent: one subprocess per side, then the comparison


def _flags(s: BenchSettings) -> list[str]:
    out = []
    for f in fields(s):
        v = getattr(s, f.name)
        if v is not None:
            out += [f"--{f.name.replace('_', '-')}", str(v)]
    return out


def run_side_subprocess(side: str, s: BenchSettings) -> dict[str, Any]:
    """Run one side in a fresh interpreter (its own RSS high-water mark); its JSON comes on stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, *_flags(s)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{SIDE_NAMES[side]} side failed (exit {proc.returncode}); its error is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


ROWS = (  # key, label, format, ratio embedft/ST shown
    ("train_s", "training call wall time (s)", "{:.1f}", False),
    ("samples_per_s", "samples/s (pairs)", "{:.1f}", True),
    ("tokens_per_s", "tokens/s", "{:.0f}", True),
    ("step_samples_per_s", "samples/s, step time only", "{:.1f}", True),
    ("first_step_s", "first step (s)", "{:.2f}", False),
    ("later_step_samples_per_s", "samples/s, steps 2 on", "{:.1f}", True),
    ("peak_rss_mb", "peak RSS, process (MB)", "{:.0f}", True),
    ("train_rss_increase_mb", "RSS increase during training (MB)", "{:.0f}", True),
    ("cuda_peak_mb", "CUDA peak allocated (MB)", "{:.0f}", True),
    ("first_loss", "loss, first step", "{:.4f}", False),
    ("final_loss", f"loss, mean of last {LOSS_WINDOW} steps", "{:.4f}", False),
    ("recall@10", "held-out recall@10 (exact)", "{:.4f}", False),
    ("r_cap@10", "held-out R_cap@10 (exact; recall@10 before issue 29)", "{:.4f}", False),
)


def compare(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """embedft / ST ratios of throughput and memory (> 1: embedft is faster / uses more)."""
    if not {"st", "embedft"} <= set(results):
        return {}
    st, ours = results["st"], results["embedft"]
    return {k: ours[k] / st[k] for k, _, _, ratio in ROWS if ratio and st.get(k) and ours.get(k) is not None}


def format_table(results: dict[str, dict[str, Any]], ratios: dict[str, float]) -> str:
    """A plain-text table of both sides and the ratios."""
    sides = [s for s in SIDES if s in results]
    head = f"{'':36s}" + "".join(f"{SIDE_NAMES[s]:>24s}" for s in sides) + (f"{'embedft/ST':>12s}" if ratios else "")
    lines = [head]
    for key, label, fmt, _ in ROWS:
        if all(results[s].get(key) is None for s in sides):
            continue
        cells = "".join(f"{fmt.format(results[s][key]) if results[s].get(key) is not None else '-':>24s}"
                        for s in sides)
        ratio = f"{ratios[key]:>11.2f}x" if key in ratios else ""
        lines.append(f"{label:36s}{cells}{ratio}")
    return "\n".join(lines)


def environment(s: BenchSettings) -> dict[str, Any]:
    import peft
    import sentence_transformers
    import torch
    import transformers

    dev = _device(s.device)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "peft": peft.__version__}


NOTES = (
    "batches: both sides get the first steps*batch_size pairs of embedft.data.batches.epoch_batches(seed) in order; "
    "ST reads them with a sequential batch sampler (no shuffle, no NO_DUPLICATES), so batch i is identical",
    "adapter: peft.inject_adapter_in_model on the ST model's transformer (what ST's add_adapter runs, in place) vs "
    "embedft apply_lora (peft get_peft_model); same targets, r, alpha, dropout, seed",
    "timing: wall time of trainer.train() / train(), nothing subtracted (ST tokenises per batch inside it, "
    "embedft tokenises each text inside its step, the first time a batch needs it); step-only: ST on_step_begin->on_step_end, embedft its step sum",
    "loss: embedft masks in-batch candidates of the anchor's own product and embeds duplicate texts once; "
    "MNRL does not (see same_product_pairs_per_batch)",
    "schedule: HF linear warmup starts at lr 0 on step 1, embedft at lr/warmup (one-step shift); "
    "AdamW fused (HF default) vs foreach (embedft)",
)


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{value!r}: use true or false")
    return value.lower() in ("true", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(BenchSettings):
        kind = {"int": int, "float": float, "str": str, "int | None": int, "bool": _bool}[f.type]
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    ap.add_argument("--sides", default="st,embedft", help="comma-separated: st, embedft (each in its own process)")
    ap.add_argument("--side", choices=SIDES, help="internal: run one side in this process, JSON on stdout")
    args = vars(ap.parse_args())
    side, sides = args.pop("side"), args.pop("sides")
    s = BenchSettings(**args)

    if side is not None:
        with contextlib.redirect_stdout(sys.stderr):  # HF prints its logs on stdout; stdout is for the JSON
            result = run_side(side, s)
        print(json.dumps(result))
        return

    wanted = [x.strip() for x in sides.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in SIDES]
    if unknown or not wanted:
        ap.error(f"--sides {sides!r}: use a comma-separated subset of {', '.join(SIDES)}")
    results = {x: run_side_subprocess(x, s) for x in wanted}
    digests = {r["pairs_digest"] for r in results.values()}
    if len(digests) > 1:
        raise RuntimeError(f"the sides trained on different pairs (digests {digests}); this is a benchmark bug")
    ratios = compare(results)
    first = next(iter(results.values()))
    print(f"\nLoRA training, {first['steps']} steps x batch {s.batch_size}, max_length {s.max_length}, "
          f"model {s.model}, data {first['data']}, {first['device']}, torch threads {first['torch_threads']}; "
          f"recall@10 on {first['queries']} queries / {first['corpus']} offers")
    print(format_table(results, ratios))
    print(f"pairs digest {first['pairs_digest']} (identical on all sides); "
          f"same-product in-batch pairs per batch: {first['same_product_pairs_per_batch']:.2f}")
    for note in NOTES:
        print(f"- {note}")
    print(json.dumps({"settings": asdict(s), "environment": environment(s), "results": results,
                      "ratios_embedft_over_st": ratios, "notes": list(NOTES)}))


if __name__ == "__main__":
    main()
