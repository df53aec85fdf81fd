"""Host time to pad one batch: embedft's vectorised `Encoder.collate` vs a tensor per row.

    python benchmarks/bench_collate.py [--model minilm] [--repeats 200]

The reference is the per-row fill embedft used before (a `torch.tensor` and two slice
assignments per text). Both run on the same random token ids, in the same process, alternating;
their outputs are checked equal first. On a GPU the host pads the next batch while the device
waits, so for small models this time is part of every encoding and training step.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SHAPES = ((128, 24), (128, 64), (1024, 40))  # (texts, longest): encode batches, a large training batch


def per_row_collate(ids, pad: int, left: bool):
    """The reference: one tensor per row, copied into the padded batch."""
    import torch

    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        cols = slice(longest - len(x), longest) if left else slice(0, len(x))
        input_ids[i, cols] = torch.tensor(x)
        mask[i, cols] = 1
    return input_ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from embedft.config import ModelConfig
    from embedft.modeling.encoder import load_encoder

    enc = load_encoder(ModelConfig(name=args.model))
    pad, left = enc.tokenizer.pad_token_id or 0, enc.spec.padding_side == "left"
    rng = np.random.default_rng(0)
    print(f"{args.model} ({enc.spec.padding_side} padding), cpu ({os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}), torch {torch.__version__}, best of {args.repeats}")
    print("| texts | longest | per-row (ms) | embedft collate (ms) | speed-up |\n|---|---|---|---|---|")
    for rows, longest in SHAPES:
        ids = [rng.integers(100, 20000, size=int(n)).tolist() for n in rng.integers(longest // 2, longest + 1, rows)]
        ref, ours = per_row_collate(ids, pad, left), enc.collate(ids)
        assert torch.equal(ref[0], ours["input_ids"]) and torch.equal(ref[1], ours["attention_mask"])
        best = {"ref": float("inf"), "ours": float("inf")}
        for _ in range(args.repeats):
            for side, f in (("ref", lambda: per_row_collate(ids, pad, left)), ("ours", lambda: enc.collate(ids))):
                t0 = time.perf_counter()
                f()
                best[side] = min(best[side], time.perf_counter() - t0)
        print(f"| {rows} | {longest} | {best['ref'] * 1e3:.2f} | {best['ours'] * 1e3:.2f} | "
              f"{best['ref'] / best['ours']:.1f}x |")


if __name__ == "__main__":
    main()
