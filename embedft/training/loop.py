"""The training loop: LoRA parameters only, a named contrastive loss, warmup + decay, checkpoints.

Read `train()` top to bottom: setup, (resume), epoch loop -> step -> log (-> checkpoint every
train.checkpoint_every steps), validate (-> select the best epoch, stop early), checkpoint; at the
end the best epoch's weights are put back (`embedft.training.selection`). The batch order is a pure function of
(seed, epoch), and the checkpoint holds the optimizer, scheduler and RNG state, so a killed
run resumes exactly, mid-epoch too (`embedft.training.checkpoint`). The loop does not know
which loss it runs: it calls the one `loss.name` names (`embedft.training.losses`).

Under torchrun (`embedft.distributed`) every rank runs this same loop over the same batch
schedule: each embeds its share of a step's sequences, the loss sees the whole global batch
(`step.embed_global`), the LoRA gradients are summed over the ranks, and every rank takes the same
optimizer step. Rank 0 alone writes checkpoints and logs metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from embedft import distributed
from embedft.config import LossConfig, TrainConfig, resolve_batch_sampling, resolve_epochs
from embedft.data.batches import PairSource, check_schedule, epoch_batches
from embedft.modeling.encoder import Encoder, compile_layers
from embedft.modeling.lora import lora_settings
from embedft.modeling.runtime import lora_input_casts, seed_everything, uses_amp
from embedft.training.checkpoint import (
    check_resumable,
    load_checkpoint,
    load_checkpoint_arrays,
    rank_rng_state,
    run_identity,
    save_checkpoint,
)
from embedft.training.losses import build_loss
from embedft.training.mining import Miner
from embedft.training.result import TrainResult
from embedft.training.selection import Selection
from embedft.training.step import forward_backward
from embedft.training.tokens import TokenCache, batch_sequences
from embedft.training.validation import ValSet, selected_metric, validate

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class _NoSink:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


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


def train(encoder: Encoder, src: PairSource, cfg: TrainConfig, loss_cfg: LossConfig, out_dir: str | Path, *,
          val: ValSet | None = None, sink: MetricSink | None = None, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train the encoder's LoRA parameters on src; checkpoints go to out_dir/checkpoint."""
    dist = distributed.current()
    sink = sink if sink is not None and dist.is_main else _NoSink()
    progress = progress and dist.is_main
    out = Path(out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = next(encoder.parameters()).device
    amp = uses_amp(encoder, device)
    seed_everything(cfg.seed)  # train.threads is the caller's: a process setting, set before the model loads
    if dist.rank:  # each rank its own dropout masks; the batch schedule is numpy's, seeded alike everywhere
        torch.manual_seed(cfg.seed + dist.rank)

    cfg = dataclasses.replace(cfg, epochs=resolve_epochs(cfg.epochs, src.shape))  # auto: by the data's shape
    n_total = check_schedule(src, cfg)
    ckpt = out / "checkpoint"
    loss_fn = build_loss(loss_cfg)
    identity = run_identity(encoder.spec, lora_settings(encoder), src, cfg, loss_cfg, dist.world_size)
    if resume:
        check_resumable(ckpt, identity)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * n_total)
    if cfg.compile:
        log.info("compiling %d layers (torch.compile)", compile_layers(encoder))
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    distributed.broadcast_params(trainable)  # every rank starts from rank 0's LoRA weights
    opt = make_optimizer(encoder, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(n_total, warmup, cfg.scheduler))
    cache = TokenCache(encoder, src.texts)
    val_cache = None
    if val is not None and val.loss_source is not None:
        val_cache = (val.loss_source, TokenCache(encoder, val.loss_source.texts))

    # Mined negatives / neighbouring groups: a resumed run takes those its checkpoint holds, else they
    # are mined before any resume, from the starting weights (as the uninterrupted run did).
    sampling = resolve_batch_sampling(cfg.batch_sampling, src.shape)  # auto: by the data's shape
    miner = Miner(encoder, src, cache, loss_cfg, sampling, device)
    miner.start(load_checkpoint_arrays(ckpt) if resume else None)

    result = TrainResult(steps=0, epochs_done=0)
    selection = _new_selection(val, cfg)
    start_epoch, step, skip = 0, 0, 0
    if resume:
        start_epoch, step, skip = load_checkpoint(ckpt, encoder, opt, sched, result, selection, rank=dist.rank)
        result.epochs_done = start_epoch
        log.info("resumed from %s at step %d (epoch %d, after %d of its batches)", ckpt, step, start_epoch + 1, skip)

    encoder.train()
    _say_batch(src, cfg, loss_cfg, sampling, dist)
    seen, tokens, t_train = 0, 0, 0.0
    logged = (0, 0.0)  # (seen, t_train) at the last log line: the logged rate is over the steps since it
    # The bar is closed however the loop ends (a NaN loss, Ctrl-C), so the error line starts on a
    # line of its own; the base model's dropout is put back however it ends, too.
    with tqdm(total=n_total, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not progress) as bar, \
            base_dropout(encoder, cfg.base_dropout) as n_off:
        if n_off:
            log.info("train.base_dropout=false: %d dropout layers of the base model off (LoRA dropout stays)", n_off)
        for epoch in range(start_epoch, cfg.epochs):
            if step >= n_total or (selection is not None and selection.should_stop):
                break
            miner.at_epoch_start(step, mid_epoch_resume=epoch == start_epoch and skip > 0)
            batches = epoch_batches(src, cfg.batch_size, cfg.seed, epoch, sampling,
                                    loss_cfg.hard_negatives, None, cfg.group_size, miner.neighbours)
            # An epoch's batches are a pure function of (seed, epoch): a run resumed from a
            # mid-epoch checkpoint skips the ones done and goes on with the same next batch.
            skip = skip if epoch == start_epoch else 0
            for i, batch in enumerate(itertools.islice(batches, skip, None), start=skip):
                if step >= n_total:
                    break
                t0 = time.perf_counter()
                batch = miner.attach(batch)
                seqs, gather = batch_sequences(batch, cache)
                def loss_of(emb: torch.Tensor) -> torch.Tensor:  # emb (N, D): the step's whole global batch
                    miner.record(gather, emb)  # loss.mine_from_steps: the vectors the next refresh searches
                    return loss_fn(emb, batch, gather, src.keys)
                with lora_input_casts(encoder, enabled=not amp):  # forward and backward alike
                    loss = forward_backward(encoder, seqs, loss_of, device, amp, mini_batch_size=cfg.mini_batch_size)
                distributed.all_reduce_grads(trainable)  # under torchrun: the ranks' shares summed
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
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
                        log.info("step %d/%d loss=%.4f lr=%.2e samples/s=%.1f (run average %.1f)", step, n_total,
                                 loss, rec["train/lr"], (seen - logged[0]) / max(t_train - logged[1], 1e-9),
                                 seen / max(t_train, 1e-9))
                        logged = (seen, t_train)
                miner.after_step(step, n_total)  # before the checkpoint, which keeps what it mined
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < n_total:
                    _checkpoint(ckpt, encoder, opt, sched, epoch, step, result, identity, batches_done=i + 1,
                                arrays=miner.state(), selection=selection)
            epoch_done = epoch + 1
            if val is not None and cfg.eval_every_epoch:
                metrics = validate(encoder, val, val_cache, loss_fn, cfg.batch_size, device, cfg.seed,
                                   sampling=sampling, group_size=cfg.group_size)
                metrics = distributed.broadcast_object(metrics)  # every rank selects and stops on rank 0's figures
                result.val_history.append({"epoch": epoch_done, "step": step, **metrics})
                sink.log_metrics({**metrics, "epoch": float(epoch_done)}, step=step)
                log.info("epoch %d: %s", epoch_done, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                _select(selection, metrics, epoch_done, encoder)
            _checkpoint(ckpt, encoder, opt, sched, epoch_done, step, result, identity, arrays=miner.state(),
                        selection=selection)
            result.epochs_done = epoch_done
    _finish_selection(selection, encoder, result, cfg)
    result.steps = step
    result.train_seconds = t_train
    result.samples_per_s = seen / t_train if t_train else 0.0
    result.tokens_per_s = tokens / t_train if t_train else 0.0
    return result


def _checkpoint(path: Path, *args, **kwargs) -> None:
    """`save_checkpoint` by rank 0, with every rank's RNG state (each rank draws its own dropout)."""
    dist = distributed.current()
    rngs = distributed.all_gather_object(rank_rng_state()) if dist.enabled else None
    if dist.is_main:
        save_checkpoint(path, *args, rank_rng=rngs, **kwargs)


def _say_batch(src: PairSource, cfg: TrainConfig, loss_cfg: LossConfig, sampling: str, dist) -> None:
    """The global batch, each rank's share of it and the negatives an anchor is scored against."""
    per_rank = cfg.batch_size / dist.world_size
    if src.positives is not None:  # pairs: the other rows' positives and every row's hard negatives
        negs = cfg.batch_size - 1 + cfg.batch_size * loss_cfg.hard_negatives
    else:  # group batches: the texts of the other groups (and the mined ones)
        negs = cfg.batch_size - cfg.group_size + cfg.batch_size * loss_cfg.hard_negatives
    log.info("batch: %d %s per step (global), %s per rank on %d rank(s); about %d negatives per anchor",
             cfg.batch_size, "rows" if src.positives is not None else f"texts ({sampling})",
             f"{per_rank:g}", dist.world_size, negs)


def _new_selection(val: ValSet | None, cfg: TrainConfig) -> Selection | None:
    """Model selection (train.select_best) and early stopping (train.patience) on the validation
    split; the best epoch is recorded whenever there is a validation split."""
    if val is None or not cfg.eval_every_epoch:
        return None
    return Selection(selected_metric(val, cfg.select_metric), patience=cfg.patience, keep_weights=cfg.select_best)


def _select(selection: Selection | None, metrics: dict[str, float], epoch: int, encoder: Encoder) -> None:
    """Hand an epoch's validation metrics to model selection, and say what it decided."""
    if selection is None:
        return
    if selection.update(metrics, epoch, encoder):
        log.info("epoch %d: best so far (%s=%.4f)", epoch, selection.metric, selection.best_value)
    elif selection.should_stop:
        log.info("stopping early: %s has not improved for %d epochs (train.patience); best %.4f at epoch %d",
                 selection.metric, selection.bad_epochs, selection.best_value, selection.best_epoch)


def still_improving(val_history: list[dict[str, float]], metric: str, best_epoch: int, epochs: int) -> bool:
    """Whether the schedule's last epoch (of 2 or more) was the best by `metric` and raised it over the epoch before
    (not a tie of a saturated metric that the validation loss broke)."""
    if epochs < 2 or best_epoch != epochs or len(val_history) < 2 or val_history[-1]["epoch"] != epochs:
        return False
    return val_history[-1][metric] > val_history[-2][metric]


def _finish_selection(selection: Selection | None, encoder: Encoder, result: TrainResult, cfg: TrainConfig) -> None:
    """Put the best epoch's weights back (train.select_best) and record which epoch that was."""
    if selection is None or selection.best_epoch == 0:
        return
    result.best_epoch, result.best_metric = selection.best_epoch, {selection.metric: selection.best_value}
    result.stopped_early = selection.should_stop and result.epochs_done < cfg.epochs
    if still_improving(result.val_history, selection.metric, selection.best_epoch, cfg.epochs):
        result.suggested_epochs = cfg.epochs + 2
        before, last = (v[selection.metric] for v in result.val_history[-2:])
        log.warning("the last epoch (%d of %d) was the best, %s %.4f -> %.4f: the model may still be improving; more "
                    "epochs may pay (-o train.epochs=%d: train.select_best keeps the best epoch, train.patience stops "
                    "when the metric does)", cfg.epochs, cfg.epochs, selection.metric, before, last,
                    result.suggested_epochs)
    if cfg.select_best and selection.restore(encoder):
        log.info("kept epoch %d of %d (train.select_best): %s=%.4f", selection.best_epoch, result.epochs_done,
                 selection.metric, selection.best_value)
