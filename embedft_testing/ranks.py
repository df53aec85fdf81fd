"""Test support for torchrun-like runs: N gloo processes spawned from a test, and the training
scenarios the one-process/N-process equivalence tests run in both."""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch

        torch.set_num_threads(1)
        from embedft import distributed

        distributed.setup("cpu")
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - the test shows the rank's traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from embedft import distributed

        distributed.teardown()


def run_ranks(fn: Callable, world: int, *args, timeout: float = 300) -> list[Any]:
    """fn(*args) in `world` spawned processes joined like torchrun's (gloo); each rank's result in
    rank order. fn must be importable (a module-level function); a rank's failure raises here."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            try:
                rank, status, value = q.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(f"the ranks did not finish in {timeout} s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


# ---------------------------------------------------------------------------------------
# Training scenarios: the same run in one process and under N ranks.

WORDS = ["apple", "samsung", "sony", "bosch", "intel", "canon", "nikon", "miele", "lg", "amd", "pixel", "galaxy"]
FILLER = ["tv", "phone", "black", "white", "pro", "max", "mini", "case", "usb", "cable"]


def grouped_examples(n_groups: int = 12, per_group: int = 4, labels: bool = False):
    """Groups of texts sharing a word pair (of three categories when `labels`), of uneven lengths."""
    from embedft.data.examples import Examples

    rng = np.random.default_rng(0)
    texts, groups, cats = [], [], []
    for g in range(n_groups):
        key = f"{WORDS[g % len(WORDS)]} {WORDS[(g * 5 + 3) % len(WORDS)]} {g}"
        for j in range(per_group):
            filler = " ".join(rng.choice(FILLER, size=int(rng.integers(1, 7))))
            texts.append(f"{filler} {key} {j}")
            groups.append(str(g))
            cats.append(f"cat{g % 3}")
    return Examples("grouped", "toy", np.arange(len(texts)) + 1, texts, groups=groups,
                    labels=cats if labels else None)


def pairs_examples(n: int = 40):
    """Query -> positive rows (some queries twice), so mining has documents to choose from."""
    from embedft.data.examples import Examples

    rng = np.random.default_rng(1)
    queries, positives = [], []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 2) % len(WORDS)]
        queries.append(f"{a} {b} {i % 30}")
        positives.append(f"{' '.join(rng.choice(FILLER, size=int(rng.integers(1, 6))))} {a} {b} {i % 30} offer")
    return Examples("pairs", "toy", np.arange(n) + 1, queries, positives=positives)


SCENARIOS = ("pairs_hard", "groups_label", "cached")


def scenario_config(name: str):
    """(examples, TrainConfig, LossConfig) of a named scenario: pairs with mined hard negatives (refreshed
    mid-run), group batches with the label term, and cached negatives (GradCache) on group batches."""
    from embedft.config import LossConfig, TrainConfig

    base = TrainConfig(epochs=2, batch_size=8, lr=2e-3, warmup_steps=1, log_every=1, base_dropout=False,
                       eval_every_epoch=False, select_best=False, patience=None)
    if name == "pairs_hard":
        return (pairs_examples(), replace(base, batch_sampling="random"),
                LossConfig(temperature=0.1, hard_negatives=2, mine_every=3, symmetric=True))
    if name == "groups_label":
        return (grouped_examples(labels=True), replace(base, batch_sampling="groups", group_size=4),
                LossConfig(temperature=0.1, label_weight=0.2))
    if name == "cached":
        return (grouped_examples(), replace(base, batch_sampling="groups", group_size=4, mini_batch_size=3),
                LossConfig(temperature=0.1))
    raise ValueError(name)


def train_scenario(model_dir: str, name: str, out_dir: str, dtype: str = "float32", dropout: float = 0.0,
                   kill_after_checkpoint: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a scenario with the tiny model at model_dir (LoRA dropout `dropout`); returns the per-step
    losses and the trained LoRA weights. `kill_after_checkpoint`: raise KeyboardInterrupt on every
    rank right after that many checkpoints (a killed run); `resume`: continue out_dir's checkpoint."""
    import torch

    import embedft.training.loop as loop
    from embedft.config import LoraConfig, ModelConfig
    from embedft.data.batches import build_pair_source
    from embedft.modeling.builders import build_encoder

    ex, cfg, loss_cfg = scenario_config(name)
    if kill_after_checkpoint is not None or resume:
        cfg = replace(cfg, checkpoint_every=2)
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(name=model_dir), "cpu", LoraConfig(r=4, alpha=8, dropout=dropout))
    enc.to(getattr(torch, dtype))
    if kill_after_checkpoint is not None:
        real, saves = loop._checkpoint, []

        def checkpoint_then_die(*a, **k):
            real(*a, **k)
            saves.append(1)
            if len(saves) == kill_after_checkpoint:
                raise KeyboardInterrupt
        loop._checkpoint = checkpoint_then_die
    try:
        res = loop.train(enc, build_pair_source(ex), cfg, loss_cfg, Path(out_dir), progress=False, resume=resume)
    except KeyboardInterrupt:
        return {"killed": True}
    finally:
        if kill_after_checkpoint is not None:
            loop._checkpoint = real
    return {"losses": [h["train/loss"] for h in res.history], "steps": res.steps,
            "adapter": {k: v.detach().double().numpy().copy() for k, v in enc.named_parameters() if v.requires_grad}}


def scenarios_in_ranks(model_dir: str, out_dir: str, names: tuple[str, ...] = SCENARIOS) -> dict[str, Any]:
    """Every named scenario, one after another in one set of processes (started once)."""
    return {n: train_scenario(model_dir, n, f"{out_dir}/{n}") for n in names}


def killed_and_resumed(model_dir: str, name: str, out_dir: str, dropout: float) -> dict[str, Any]:
    """A scenario uninterrupted, then killed after its 2nd checkpoint (mid-epoch) and resumed."""
    full = train_scenario(model_dir, name, f"{out_dir}/full", dropout=dropout)
    killed = train_scenario(model_dir, name, f"{out_dir}/resumed", dropout=dropout, kill_after_checkpoint=2)
    if killed.get("killed"):
        import json

        killed["checkpoint"] = json.loads(Path(f"{out_dir}/resumed/checkpoint/progress.json").read_text())
    resumed = train_scenario(model_dir, name, f"{out_dir}/resumed", dropout=dropout, resume=True)
    return {"full": full, "killed": killed, "resumed": resumed}
