"""Peak memory and time of `embedft index build` on corpora larger than memory: streamed vs read whole.

    nice python benchmarks/bench_index_stream.py [--rows 1000000,4000000] [--in-memory-rows 1000000,4000000]
        [--chunk-rows 100000] [--index Flat] [--threads 1]

A tiny random BERT (hidden 32, 2 layers: `embedft_testing.synthetic.tiny_bert`, as a sentence-transformers
folder) embeds synthetic short texts ("<word> <word> <word> <row>", all distinct, 8-14 tokens) written to a
CSV. Each build runs in a process of its own (`--one`, the command run in-process), so its peak RSS
(`ru_maxrss`) is its own: the build streamed in chunks of --chunk-rows through on-disk shards, and read
whole (`--chunk-rows 0`), at each size. A baseline process builds a 1,000-row index: what Python, torch,
sentence-transformers and the model hold before any corpus. The index itself (index.faiss; Flat: 4 x 32
bytes a row) is what the streamed build's peak may grow by with the corpus. --threads sets the torch and
faiss threads of each build (1: a build is not slowed by other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
WORDS = ("apple samsung sony bosch intel canon phone tv fridge washer camera processor black white silver 4k "
         "smart pro max mini ultra plus edition model series inch gb tb kg").split()


def write_corpus(path: Path, rows: int, seed: int = 0, block: int = 200_000) -> Path:
    """A CSV of `rows` short distinct texts (id, text), written a block at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,text\n")
        for start in range(0, rows, block):
            picks = words[rng.integers(0, len(words), (min(block, rows - start), 3))]
            f.write("".join(f"d{start + i},{a} {b} {c} {start + i}\n" for i, (a, b, c) in enumerate(picks)))
    return path


def one(spec: dict) -> dict:
    """Run one `index build` in this process; its wall time, peak RSS and index size."""
    import faiss
    import torch

    torch.set_num_threads(spec["threads"])
    faiss.omp_set_num_threads(spec["threads"])
    from embedft.cli import main

    t0 = time.perf_counter()
    main(["index", "build", "--model", spec["model"], "--corpus", spec["corpus"], "--out", spec["out"], "--index",
          spec["index"], "--chunk-rows", str(spec["chunk_rows"]), "--device", "cpu", "--no-progress"],
         standalone_mode=False)
    seconds = time.perf_counter() - t0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mib": kb / 1024 if sys.platform != "darwin" else kb / 2**20,
            "index_mib": (Path(spec["out"]) / "index.faiss").stat().st_size / 2**20}


def run(spec: dict) -> dict:
    """`one` in a fresh process (so that peaks do not mix); its figures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"index build of {spec['corpus']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,4000000", help="corpus sizes built streamed (comma-separated)")
    ap.add_argument("--in-memory-rows", default="1000000,4000000", help="of those, the sizes also built read whole")
    ap.add_argument("--chunk-rows", type=int, default=100_000)
    ap.add_argument("--index", default="Flat", help="FAISS factory string")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return []
    sys.path.insert(0, str(REPO))
    from embedft_testing.synthetic import save_as_sentence_transformer, tiny_bert

    rows, whole = _sizes(args.rows), set(_sizes(args.in_memory_rows))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(save_as_sentence_transformer(tiny_bert(root / "model")))

        def build(n: int, chunk_rows: int, path: str) -> None:
            corpus = root / f"corpus-{n}.csv"
            if not corpus.exists():
                write_corpus(corpus, n)
            spec = {"model": model, "corpus": str(corpus), "out": str(root / f"index-{n}-{chunk_rows}"),
                    "index": args.index, "chunk_rows": chunk_rows, "threads": args.threads}
            r = {"rows": n, "path": path, **run(spec)}
            results.append(r)
            print(f"{n:,} rows, {path}: {r['seconds']:.1f} s, peak {r['peak_mib']:,.0f} MiB", file=sys.stderr)

        build(1000, 0, "baseline (1,000 rows, read whole)")
        for n in rows:
            build(n, args.chunk_rows, f"streamed, chunks of {args.chunk_rows:,}")
            if n in whole:
                build(n, 0, "read whole (`--chunk-rows 0`)")
    print(f"tiny BERT (hidden 32, 2 layers), --index {args.index}, {args.threads} thread(s); "
          f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}); load {os.getloadavg()[0]:.1f}")
    print("| corpus rows | build | peak RSS | time | texts/s | index.faiss |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['path']} | {r['peak_mib']:,.0f} MiB | {r['seconds']:.1f} s | "
              f"{r['rows'] / r['seconds']:,.0f} | {r['index_mib']:,.1f} MiB |")
    return results


if __name__ == "__main__":
    main()
