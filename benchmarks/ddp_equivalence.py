"""How close 2 gloo processes come to one process, per training scenario: the figures behind the
equivalence tests (tests/training/test_train_ranks.py asserts <= 1e-5; this prints what it is).

    python benchmarks/ddp_equivalence.py [--dtype float32,float64]

Each scenario of `embedft_testing.ranks` (pairs with mined, refreshed hard negatives; group batches
with the label term; cached negatives) trains the tiny random BERT with dropout off, in this process
and in 2 spawned ranks; printed: steps, the largest per-step loss difference, the largest LoRA weight
difference to one process, and between the two ranks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from embedft_testing.ranks import SCENARIOS, run_ranks, train_scenario
    from embedft_testing.synthetic import tiny_bert

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32,float64")
    args = ap.parse_args()
    torch.set_num_threads(1)

    def diff(a: dict, b: dict) -> float:
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_bert(Path(tmp) / "tiny"))
        print("| dtype | scenario | steps | max loss diff | max weight diff vs 1 process | rank 0 vs rank 1 |")
        print("|---|---|---|---|---|---|")
        for dtype in args.dtype.split(","):
            for name in SCENARIOS:
                one = train_scenario(model, name, f"{tmp}/one-{dtype}-{name}", dtype)
                r0, r1 = run_ranks(train_scenario, 2, model, name, f"{tmp}/two-{dtype}-{name}", dtype)
                loss = max(abs(a - b) for a, b in zip(one["losses"], r0["losses"]))
                print(f"| {dtype} | {name} | {one['steps']} | {loss:.1e} | {diff(one['adapter'], r0['adapter']):.1e} | "
                      f"{diff(r0['adapter'], r1['adapter']):.1e} |", flush=True)


if __name__ == "__main__":
    main()
