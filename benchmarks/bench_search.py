"""Evaluation at corpus scale: exact-search retrieval metrics over 1M vectors, timed end to end.

    python benchmarks/bench_search.py [--corpus 1000000] [--queries 10000] [--dim 1024] [--k 100]

Random unit vectors stand in for an encoded corpus (search time does not depend on their
values); each query is a noisy copy of one corpus row, which is its one relevant item.
Times `embedft.evaluation.tasks.evaluate_retrieval` (faiss IndexFlatIP, on GPU when faiss-gpu is
installed and a GPU is visible, else torch's `TorchFlatIP` on a GPU, else faiss-cpu; then
recall@{1,5,10,100}, MRR@10, nDCG@10), and on a GPU the exact search alone. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def unit(x):
    import numpy as np

    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def torch_search_seconds(corpus, queries, k: int) -> float:
    """Seconds for exact search alone by `TorchFlatIP` on the GPU (the corpus already there)."""
    import torch

    from embedft.evaluation.index import TorchFlatIP, search

    index = TorchFlatIP(corpus, "cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    search(index, queries, k)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024, help="1024 = Qwen3-Embedding-0.6B, 384 = MiniLM")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import faiss
    import numpy as np
    import torch

    from embedft.data.examples import RetrievalTask
    from embedft.evaluation.index import _gpu_available
    from embedft.evaluation.tasks import evaluate_retrieval

    rng = np.random.default_rng(args.seed)
    corpus = unit(rng.standard_normal((args.corpus, args.dim), dtype=np.float32))
    targets = rng.choice(args.corpus, size=args.queries, replace=False)
    queries = unit(corpus[targets] + 0.05 * rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    task = RetrievalTask([""] * args.queries, [""] * args.corpus, [np.array([t]) for t in targets], None)

    ks = tuple(sorted({1, 5, 10, args.k}))
    t0 = time.perf_counter()
    out = evaluate_retrieval(queries, corpus, task, ks=ks)
    seconds = time.perf_counter() - t0
    cuda = torch.cuda.is_available()
    result = {
        "corpus": args.corpus, "queries": args.queries, "dim": args.dim, "k": args.k,
        "faiss": faiss.__version__, "faiss_gpu": _gpu_available(), "faiss_threads": faiss.omp_get_max_threads(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "evaluate_retrieval_seconds": round(seconds, 2),
        f"recall@{args.k}": out.metrics[f"retrieval/recall@{args.k}"], "mrr@10": out.metrics["retrieval/mrr@10"],
        "torch_gpu_search_seconds": round(torch_search_seconds(corpus, queries, args.k), 2) if cuda else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
