"""Two CPU processes (torchrun's way, gloo) against one, at the same global batch, and what the
communication costs.

    python benchmarks/bench_ddp.py [--config experiments/default.yaml] [--steps 40] [--threads 2]
                                   [--comm-repeats 50]

Three measurements, back to back on the same machine:
- **1 process x `--threads` threads**: the experiment's training loop for `--steps` steps (model,
  data, LoRA and batch schedule as `embedft train` builds them; no evaluation);
- **`--threads` processes x 1 thread**: the same steps under 2 gloo ranks spawned like torchrun's;
  every rank embeds its share of each global batch (`embedft.distributed`). Samples/s is the
  global batch over the step time; the loss is rank 0's (every rank computes the same);
- **communication alone**: in the same 2 ranks, with a barrier before each so no rank waits for
  another, the collectives one training step makes: the all-gather of the batch's embeddings (as
  many rows, at the model's width, as the experiment's steps embed on average) and the all-reduce
  of the LoRA gradients (every trainable parameter, fp32). Median of `--comm-repeats`.
The step-time share of communication in the training run itself (which includes waiting for the
slower rank) is timed too, by wrapping the two collectives.

Timings need an otherwise idle machine (see bench_train.py); the figures printed say the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _setup(config: str, steps: int, overrides: list[str]):
    """(encoder, fit source, train config, loss config) as the train recipe builds them."""
    import torch

    from embedft.config import load_config
    from embedft.modeling.builders import make_trainable
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.runtime import base_dtype, seed_everything
    from embedft.recipes.common import prepare_data

    cfg = load_config(str(REPO / config), ["tracking.enabled=false", *overrides])
    data = prepare_data(cfg)
    device = torch.device("cpu")
    seed_everything(cfg.train.seed)
    enc = load_encoder(cfg.model, device, cfg.lora)
    seed_everything(cfg.train.seed)
    make_trainable(enc, cfg.lora, base_dtype(cfg.train.base_dtype, device))
    tcfg = replace(cfg.train, max_steps=steps, eval_every_epoch=False, select_best=False, patience=None,
                   checkpoint_every=None, log_every=1)
    return enc, data.source, tcfg, cfg.loss


class _Timer:
    """Wall time spent inside wrapped functions."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        return timed


def run_training(config: str, steps: int, overrides: list[str], out_dir: str) -> dict:
    """The training loop for `steps` steps; in several ranks, the time inside the collectives too."""
    from embedft import distributed
    from embedft.training import loop, step

    enc, src, tcfg, loss_cfg = _setup(config, steps, overrides)
    timer = _Timer()
    real_gather, real_reduce = distributed.gather_rows, distributed.all_reduce_grads
    distributed.gather_rows = timer.wrap(real_gather)  # the module step.py and loop.py call through
    distributed.all_reduce_grads = timer.wrap(real_reduce)
    rows = []
    real_embed = step.embed_global

    def counting(encoder, seqs, device, amp):
        rows.append(len(seqs))
        return real_embed(encoder, seqs, device, amp)

    step.embed_global = counting  # what forward_backward calls
    try:
        res = loop.train(enc, src, tcfg, loss_cfg, Path(out_dir), progress=False)
    finally:
        distributed.gather_rows, distributed.all_reduce_grads = real_gather, real_reduce
        step.embed_global = real_embed
    losses = [h["train/loss"] for h in res.history]
    n_params = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    return {"steps": res.steps, "samples_per_s": res.samples_per_s, "train_seconds": res.train_seconds,
            "loss_first": losses[0], "loss_last10": statistics.mean(losses[-10:]), "losses": losses,
            "collective_seconds": timer.seconds, "rows_per_step": statistics.mean(rows) if rows else 0.0,
            "lora_params": n_params, "dim": enc.spec.hidden_size, "threads": __import__("torch").get_num_threads()}


def run_comm(rows: int, dim: int, n_params: int, repeats: int) -> dict:
    """The collectives of one step, alone: all-gather of (rows / world, dim) fp32 per rank, all-reduce
    of n_params fp32; median seconds over `repeats`, a barrier before each."""
    import torch
    import torch.distributed as td

    from embedft import distributed

    world = distributed.current().world_size
    local = torch.randn(max(1, rows // world), dim)
    flat = torch.randn(n_params)
    out = {}
    for name, op in (("all_gather", lambda: distributed.gather_rows(local, [len(local)] * world)),
                     ("all_reduce", lambda: td.all_reduce(flat))):
        times = []
        for _ in range(repeats):
            td.barrier()
            t = time.perf_counter()
            op()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    out["all_gather_bytes"] = int(local.numel() * 4 * world)
    out["all_reduce_bytes"] = int(flat.numel() * 4)
    return out


def _in_ranks(config: str, steps: int, overrides: list[str], out_dir: str, repeats: int) -> dict:
    train = run_training(config, steps, overrides, out_dir)
    comm = run_comm(int(train["rows_per_step"]), train["dim"], train["lora_params"], repeats)
    return {"train": train, "comm": comm}


def main() -> None:
    import tempfile

    import torch

    from embedft_testing.ranks import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="experiments/default.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="threads of the one process = processes of the other run")
    ap.add_argument("--comm-repeats", type=int, default=50)
    ap.add_argument("-o", "--override", action="append", default=[], help="config overrides (as embedft -o)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads)
        one = run_training(args.config, args.steps, args.override, f"{tmp}/one")
        ranks = run_ranks(_in_ranks, args.threads, args.config, args.steps, args.override, f"{tmp}/ranks",
                          args.comm_repeats, timeout=3600)
    many, comm = ranks[0]["train"], ranks[0]["comm"]
    diff = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
    n = args.threads
    rows = [
        ("1 process x %d threads" % n, one),
        ("%d processes x 1 thread" % n, many),
    ]
    print(f"\n{args.config}, {args.steps} steps, global batch as configured; load average at start {load:.1f}\n")
    print("| run | samples/s | step time (s) | loss, first step | loss, mean of last 10 | time in collectives |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        coll = f"{r['collective_seconds'] / r['train_seconds']:.1%}" if r is many else "-"
        print(f"| {name} | {r['samples_per_s']:.1f} | {r['train_seconds'] / r['steps']:.3f} | {r['loss_first']:.4f} | "
              f"{r['loss_last10']:.4f} | {coll} |")
    print(f"\nmax per-step loss difference between the two runs: {diff:.2e}")
    print(f"communication alone (median of {args.comm_repeats}, after a barrier): all-gather of "
          f"{comm['all_gather_bytes'] / 1e3:.0f} kB ({many['rows_per_step']:.0f} rows x {many['dim']}) "
          f"{comm['all_gather'] * 1e3:.2f} ms; all-reduce of {comm['all_reduce_bytes'] / 1e6:.2f} MB "
          f"({many['lora_params']} LoRA parameters) {comm['all_reduce'] * 1e3:.2f} ms; per step "
          f"{(comm['all_gather'] + comm['all_reduce']) * 1e3:.2f} ms of {many['train_seconds'] / many['steps'] * 1e3:.0f} ms")
    print(json.dumps({"one": {k: v for k, v in one.items() if k != "losses"},
                      "many": {k: v for k, v in many.items() if k != "losses"}, "comm": comm, "load": load}))


if __name__ == "__main__":
    main()
