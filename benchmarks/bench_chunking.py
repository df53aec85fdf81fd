"""How a training batch is cut into forward passes: time per step of forward + backward.

    python benchmarks/bench_chunking.py [--model minilm] [--batch-size 64] [--steps 6] [--max-length 64]

One training step embeds 2 x batch-size texts (anchors and positives) with graph and
back-propagates through the LoRA weights. The same random batches of PriceRunner titles
(data/ sample when ../shared is absent) are embedded

- `random`: as anchors and positives, each padded to its own longest (what a
  sentence-transformers MNRL step does);
- `fixed N`: sorted by length, cut every N texts;
- `length_chunks`: sorted by length, cut where padding plus a per-call overhead is least
  (what embedft's train() does), for a few overhead values.

The first step of each variant is a warm-up and is not timed. Prints ms/step and real
(unpadded) tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_encode import load_titles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="steps per scheme, the first one a warm-up (>= 2)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: give at least 2 (the first step is a warm-up, not timed)")

    import numpy as np
    import torch

    from embedft.config import LoraConfig, ModelConfig
    from embedft.modeling.chunking import length_chunks
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import apply_lora

    torch.manual_seed(args.seed)
    enc = apply_lora(load_encoder(ModelConfig(name=args.model, max_length=args.max_length)), LoraConfig(r=16, alpha=32))
    enc.train()
    titles, source = load_titles(None)
    ids = enc.tokenize(titles)
    rng = np.random.default_rng(args.seed)
    n = 2 * args.batch_size
    batches = [[ids[i] for i in rng.choice(len(ids), n, replace=False)] for _ in range(args.steps)]
    tokens = sum(len(x) for b in batches[1:] for x in b)

    def cuts(kind: str, arg: int, b: list[list[int]]) -> list[np.ndarray]:
        if kind == "random":
            return [np.arange(0, args.batch_size), np.arange(args.batch_size, n)]
        if kind == "fixed":
            order = np.argsort([len(x) for x in b], kind="stable")
            return [order[i:i + arg] for i in range(0, n, arg)]
        return length_chunks([len(x) for x in b], n, overhead=arg)

    print(f"{source}: {args.steps - 1} timed steps of {n} texts, {torch.get_num_threads()} threads")
    variants = [("random", 0), ("fixed", 64), ("fixed", 32), ("fixed", 16),
                ("length_chunks", 16), ("length_chunks", 48), ("length_chunks", 128)]
    for kind, arg in variants:
        total, calls = 0.0, 0
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            chunks = cuts(kind, arg, b)
            emb = torch.cat([enc(**enc.collate([b[j] for j in c])) for c in chunks])
            (emb @ emb.T).sum().backward()
            enc.zero_grad(set_to_none=True)
            if i:
                total += time.perf_counter() - t0
                calls += len(chunks)
        name = {"random": "random (anchors | positives)", "fixed": f"sorted, fixed chunks of {arg}",
                "length_chunks": f"length_chunks, overhead {arg} tokens"}[kind]
        print(f"{name:40s} {calls / (args.steps - 1):5.1f} calls/step {total / (args.steps - 1) * 1000:7.0f} ms/step "
              f"{tokens / total:7.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
