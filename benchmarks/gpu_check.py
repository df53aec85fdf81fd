"""GPU check: LoRA Q/K/V training throughput and memory of a Qwen3-Embedding-0.6B-shaped model.

    python benchmarks/gpu_check.py                  # on a CUDA machine: the real check
    python benchmarks/gpu_check.py --tiny --steps 3 # anywhere: exercises the same code on a tiny model

The model is randomly initialised from the published Qwen3-Embedding-0.6B config
(benchmarks/qwen3-embedding-0.6b.config.json): weights cannot be downloaded here, and
speed does not depend on their values. Texts are ~32 tokens. For each batch size it
trains a fixed number of steps with embedft's own loop (cached negatives for the large
batches), without and with `train.compile` (torch.compile of each layer; `--compile`), and
prints samples/s, tokens/s, peak GPU memory, the first step's time (compiling included) and
MFU = 4 x non-embedding parameters x tokens/s / peak bf16 FLOP/s of the device.
With --profile-batch B, batch size B trains --profile-steps more steps under torch.profiler
after its timed ones (so the timings are not slowed by it): how busy the GPU was and which kinds
of kernel took its time (`benchmarks/profiling.py`), eager and compiled side by side.
With --write, the tables are appended to docs/benchmarks.md with the device name.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "qwen3-embedding-0.6b.config.json"

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' datasheets.
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12}


def peak_flops(device_name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16.items():
        if key.lower() in device_name.lower():
            return value, key
    return None, "unknown"


def synthetic_source(n_groups: int, words_per_text: int, seed: int = 0):
    """Grouped texts of about `words_per_text` tokens (one token per word with the local tokenizer)."""
    import numpy as np

    from embedft.data.batches import build_pair_source
    from embedft.data.examples import Examples
    from embedft_testing.synthetic import WORDS

    rng = np.random.default_rng(seed)
    texts, groups = [], []
    for g in range(n_groups):
        stem = list(rng.choice(WORDS, size=words_per_text - 4))
        for j in range(2):
            texts.append(" ".join(stem + list(rng.choice(WORDS, size=3)) + [str(g * 2 + j)]))
            groups.append(str(g))
    return build_pair_source(Examples("grouped", "synthetic", np.arange(len(texts)) + 1, texts, groups=groups))


def run(batch_sizes: list[int], steps: int, tiny: bool, mini_batch: int, write: str | None,
        compile_modes: tuple[bool, ...] = (False,), model: str | None = None,
        call_overhead: int | None = None, profile_batch: int | None = None, profile_steps: int = 2) -> list[dict]:
    import numpy as np
    import torch

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    from profiling import markdown

    from embedft.config import LoraConfig, LossConfig, ModelConfig, TrainConfig
    from embedft.modeling import chunking
    from embedft.modeling.builders import build_encoder
    from embedft.training.loop import train
    from embedft_testing.synthetic import qwen3_from_config, tiny_qwen3

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    peak, peak_key = peak_flops(name) if cuda else (None, "n/a")
    rows, profiles = [], []
    # What one more forward call costs, in padded tokens, on CUDA (embedft cuts a batch into
    # length-sorted chunks only where that saves more padding than this). The default never
    # cuts; a smaller value splits e.g. instruction-prefixed anchors from their shorter positives.
    default_overhead = chunking.CUDA_CALL_OVERHEAD_TOKENS
    overhead = default_overhead if call_overhead is None else call_overhead
    chunking.CUDA_CALL_OVERHEAD_TOKENS = overhead  # put back below, however the runs end: the caller keeps its default
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if model is not None:  # built beforehand (tools/gpu_session.py builds it once for all its steps)
                path = Path(model)
            else:
                path = tiny_qwen3(Path(tmp) / "m") if tiny else qwen3_from_config(CONFIG, Path(tmp) / "m")
            for bs, compiled in [(b, c) for b in batch_sizes for c in compile_modes]:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                # On CUDA frozen base weights in bf16; LoRA weights and optimizer state stay fp32.
                enc = build_encoder(ModelConfig(name=str(path), max_length=64), device,
                                    LoraConfig(r=16, alpha=32, dropout=0.0), torch.bfloat16 if cuda else torch.float32)
                params = sum(p.numel() for n, p in enc.backbone.named_parameters()
                             if "embed" not in n and "lora_" not in n)
                extra = profile_steps if bs == profile_batch else 0  # profiled after the timed steps
                sink = _ProfileSteps(first=steps, n=extra, device=device) if extra else None
                src = synthetic_source(n_groups=bs * (steps + extra + 1), words_per_text=32)
                cfg = TrainConfig(epochs=1, max_steps=steps + extra, batch_size=bs, lr=1e-4, warmup_steps=0, log_every=1,
                                  mini_batch_size=mini_batch if bs > mini_batch else None, eval_every_epoch=False,
                                  compile=compiled)
                res = train(enc, src, cfg, LossConfig(), Path(tmp) / f"run{bs}", sink=sink, progress=False)
                timed = res.history[:steps]
                sps = [h["train/samples_per_s"] for h in timed[min(2, len(timed) - 1):]]
                samples_per_s = float(np.median(sps))
                tokens_per_sample = res.tokens_per_s / res.samples_per_s if res.samples_per_s else 0.0
                tokens_per_s = samples_per_s * tokens_per_sample
                row = {"batch": bs, "cached": cfg.mini_batch_size is not None, "compiled": compiled,
                       "samples_per_s": samples_per_s, "first_step_s": bs / res.history[0]["train/samples_per_s"],
                       "tokens_per_s": tokens_per_s, "non_embedding_params": params,
                       "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       "mfu": 4 * params * tokens_per_s / peak if peak else None}
                rows.append(row)
                print(_fmt(row), flush=True)
                if sink is not None and sink.result is not None:
                    row["profile"] = sink.result.as_dict()
                    profiles.append((f"batch {bs}, {'compiled' if compiled else 'eager'}", sink.result))
                    print(markdown(profiles[-1:]), flush=True)
                del enc
    finally:
        chunking.CUDA_CALL_OVERHEAD_TOKENS = default_overhead
    profile_args = f" --profile-batch {profile_batch} --profile-steps {profile_steps}" if profiles else ""
    table = _table(rows, name, peak, peak_key, steps, tiny, compile_modes, overhead, profile_args)
    if profiles:
        table += (f"\n\nWhere the time of {profile_steps} more step(s) at batch {profile_batch} went "
                  f"(torch.profiler, after the timed steps; one unit = one training step):\n\n" + markdown(profiles))
    print(table)
    if write:
        with Path(write).open("a") as f:
            f.write("\n" + table + "\n")
    return rows


class _ProfileSteps:
    """A metric sink (train logs every step here) that profiles steps first+1 .. first+n."""

    def __init__(self, first: int, n: int, device):
        from profiling import Profiler

        self.first, self.n, self.result, self.failed = first, n, None, False
        self._profiler = Profiler(device, reps=n)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.failed or step not in (self.first, self.first + self.n):
            return
        # A profiler that fails (no CUPTI access on a device, say) costs the profile, not the run's figures.
        try:
            if step == self.first:
                self._profiler.start()
            else:
                self.result = self._profiler.stop()
        except Exception as e:  # noqa: BLE001
            self.failed = True
            print(f"profile of steps {self.first + 1}-{self.first + self.n} failed: {type(e).__name__}: {e}",
                  flush=True)


def _fmt(r: dict) -> str:
    mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"batch {r['batch']:5d} cached={r['cached']!s:5} compiled={r['compiled']!s:5}  "
            f"{r['samples_per_s']:9.1f} samples/s  first step {r['first_step_s']:.1f} s  "
            f"{r['tokens_per_s']:11.0f} tokens/s  peak {mem}  MFU {mfu}")


def _table(rows: list[dict], device: str, peak: float | None, peak_key: str, steps: int, tiny: bool,
           compile_modes: tuple[bool, ...], call_overhead: int, profile_args: str = "") -> str:
    flag = {(False,): "no", (True,): "yes"}.get(tuple(compile_modes), "both")
    batches = ",".join(str(b) for b in dict.fromkeys(r["batch"] for r in rows))
    head = (f"### GPU check: {'tiny Qwen3' if tiny else 'Qwen3-Embedding-0.6B-shaped'} LoRA Q/K/V training\n\n"
            f"- device: {device}; peak bf16 used for MFU: {peak_key} = {peak / 1e12 if peak else 'n/a'} TFLOP/s\n"
            f"- date: {datetime.date.today().isoformat()}; command: `python benchmarks/gpu_check.py"
            f"{' --tiny' if tiny else ''} --batch-sizes {batches} --steps {steps} --compile {flag}"
            f" --call-overhead {call_overhead}{profile_args}`\n\n"
            "| batch | cached negatives | compiled layers | samples/s | tokens/s | first step (s) | peak GPU memory "
            "| MFU |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['batch']} | {'yes' if r['cached'] else 'no'} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['first_step_s']:.1f} | {mem} | {mfu} |")
    body = "\n".join(lines)
    return head + body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mini-batch", type=int, default=256, help="GradCache chunk (texts) for batches larger than this")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3 (CPU smoke run of the same code)")
    ap.add_argument("--compile", choices=("no", "yes", "both"), default="both",
                    help="train.compile (torch.compile of each layer): without, with, or each batch size both ways")
    ap.add_argument("--model", help="a Qwen3-shaped model folder built beforehand (default: build one from "
                    "benchmarks/qwen3-embedding-0.6b.config.json, or a tiny one with --tiny)")
    ap.add_argument("--call-overhead", type=int, default=None,
                    help="padded tokens one more forward call is worth on CUDA (embedft.modeling.chunking."
                         "CUDA_CALL_OVERHEAD_TOKENS; default: its value, which never splits a batch)")
    ap.add_argument("--profile-batch", type=int, default=None,
                    help="profile this batch size's extra steps (one of --batch-sizes; default: none)")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled after the timed ones")
    ap.add_argument("--write", nargs="?", const=str(REPO / "docs" / "benchmarks.md"), default=None, metavar="FILE",
                    help="append the tables to FILE (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    modes = {"no": (False,), "yes": (True,), "both": (False, True)}[args.compile]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.profile_batch is not None and args.profile_batch not in batch_sizes:
        ap.error(f"--profile-batch {args.profile_batch}: not one of --batch-sizes {args.batch_sizes}")
    if args.profile_steps < 1:
        ap.error(f"--profile-steps {args.profile_steps}: profile at least 1 step")
    run(batch_sizes, args.steps, args.tiny, args.mini_batch, args.write, modes, args.model, args.call_overhead,
        args.profile_batch, args.profile_steps)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
