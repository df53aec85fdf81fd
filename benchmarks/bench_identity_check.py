"""What `embedft index search` spends checking that the export is the one the index was built with.

    python benchmarks/bench_identity_check.py [--model PATH] [--repeats 3]

Times, on the same model folder in one process: the sha256 over its weight files
(`export.weights_digest`, what every search did before), the stat comparison that now replaces
it when the files are the ones the index was built with (`export.weights_stat`), and, for
scale, loading the folder with `SentenceTransformer` (what every search does anyway). Best of
--repeats, files in the page cache (a second search finds them there). Default model: a
Qwen3-Embedding-0.6B-shaped folder with random weights (fp32, 2.3 GB), built first; --model
times any sentence-transformers folder (e.g. an export).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def best_of(repeats: int, f) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a sentence-transformers folder (default: build a Qwen3-0.6B-shaped one)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sentence_transformers import SentenceTransformer

    from embedft.export.fingerprint import weights_digest, weights_stat
    from embedft_testing.synthetic import qwen3_from_config, save_as_sentence_transformer

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else save_as_sentence_transformer(
            qwen3_from_config(REPO / "benchmarks" / "qwen3-embedding-0.6b.config.json", Path(tmp) / "q3"))
        size = sum(v[0] for v in weights_stat(model).values())
        digest = best_of(args.repeats, lambda: weights_digest(model))
        stat = best_of(args.repeats, lambda: weights_stat(model))
        load = best_of(args.repeats, lambda: SentenceTransformer(str(model), device="cpu"))
    print(f"{args.model or 'Qwen3-0.6B-shaped (random, fp32)'}: {size / 2**30:.2f} GiB of weights; "
          f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}); best of {args.repeats}")
    print("| check before a search | seconds |\n|---|---|")
    print(f"| sha256 of the weights (`weights_digest`, before) | {digest:.3g} |")
    print(f"| stat of the weight files (`weights_stat`, now) | {stat:.3g} |")
    print(f"| for scale: `SentenceTransformer(folder)` | {load:.3g} |")


if __name__ == "__main__":
    main()
