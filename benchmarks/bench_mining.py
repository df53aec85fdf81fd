"""Hard-negative mining over many texts of few labels: seconds per mining and anchors left without a negative.

    python benchmarks/bench_mining.py [--texts 28000] [--labels 10] [--spread 0.3,3] [--dim 384] [--threads 2]

Each text's vector is its label's random centre times --spread plus unit Gaussian noise, so a large spread
gathers every label's texts nearer each other than any other label's (a label after training), a small one
mixes them. One `mine_hard_negatives` call per spread (one negative per anchor, the default search, the 5%
margin) through an encoder double that returns the planted vectors, so the time is the search and the
margin filter, not the encoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PlantedEncoder:
    """Embeds text i (its token ids are [i]) to row i of `vectors`."""

    def __init__(self, vectors: np.ndarray):
        self.spec = SimpleNamespace(query_template=None)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def tokenize(self, texts, is_query=False):
        return [[int(t[1:])] for t in texts]

    def encode_ids(self, ids, device=None, **kw):
        return self.vectors[[i[0] for i in ids]].astype(np.float32)


def mine_once(n_texts: int, n_labels: int, spread: float, dim: int, seed: int = 0) -> dict:
    """One mining of `n_texts` planted vectors in `n_labels` labels: its seconds and anchors without a negative."""
    import torch

    from embedft.data.batches import build_pair_source
    from embedft.data.examples import Examples
    from embedft.training.mining import mine_hard_negatives
    from embedft.training.tokens import TokenCache

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_texts)
    vectors = rng.standard_normal((n_labels, dim))[labels] * spread + rng.standard_normal((n_texts, dim))
    texts = [f"t{i}" for i in range(n_texts)]
    ex = Examples("labeled", "planted", np.arange(n_texts) + 1, texts, groups=[str(x) for x in labels],
                  labels=[str(x) for x in labels])
    src = build_pair_source(ex)
    enc = PlantedEncoder(vectors)
    cache = TokenCache(enc, src.texts)
    t0 = time.perf_counter()
    mined = mine_hard_negatives(enc, src, cache, 1, torch.device("cpu"), relative_margin=0.05)
    seconds = time.perf_counter() - t0
    return {"texts": n_texts, "labels": n_labels, "spread": spread, "seconds": round(seconds, 2),
            "without_negative": int((mined[np.unique(src.anchors), 0] < 0).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=28000)
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--spread", default="0.3,3")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for spread in (float(s) for s in args.spread.split(",")):
        print(mine_once(args.texts, args.labels, spread, args.dim), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
