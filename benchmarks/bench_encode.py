"""Encoding throughput: embedft's encoder vs SentenceTransformer.encode, same model, same texts.

    python benchmarks/bench_encode.py [--model minilm] [--limit N] [--batch-size 128] [--repeats 2]
                                      [--precisions auto,fp32,bf16] [--deploy] [--data auto]

Texts: the 35,311 PriceRunner titles from ../shared/datasets/pricerunner when present,
else the sample in data/ (`--data`: auto, pricerunner, sample, or the path of a CSV in
PriceRunner's layout, e.g. a copy carried to a machine that has no ../shared). Runs the sides alternately --repeats times and reports each side's best
time: throughput of both, the ratio, and the max abs
difference of the embeddings (speed is not bought with wrong vectors), as JSON too.

`--precisions` times embedft's encoder at each `eval.precision` in the same alternation (the
first one is "embedft" in the summary): `auto` (bf16 autocast over the fp32 weights on CUDA,
fp32 on CPU), `fp32` (no autocast) and `bf16` (a bf16 copy of the weights, under autocast on
CUDA, so no per-call weight casts). On CPU `auto` and `fp32` are the same path.

`--profile N` then encodes the first N texts once more per side under torch.profiler
(`benchmarks/profiling.py`): how busy the device was and which kinds of kernel took its time,
sentence-transformers beside embedft (on CUDA, a device busy well under 100% means host-bound).

`--row-capped` also times embedft's encoder (at the first precision) batched as it was before
its token bound: at most --batch-size rows per forward call. On the CPU that is its batching
anyway; on CUDA its calls now hold any number of rows up to --batch-size rows of the longest
text's padded tokens, so short titles share far fewer calls (`chunking.forward_chunks`). Each
side's forward calls per encode are reported.

`--deploy` also times `embedft.search.indexing.encode` (what `embedft index build` and `index search`
embed with): the same plain SentenceTransformer model, its texts deduplicated and batched as
embedft's encoder batches them, each batch through `SentenceTransformer.encode`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
PRICERUNNER = REPO.parent / "shared" / "datasets" / "pricerunner" / "pricerunner_aggregate.csv"


def data_csv(which: str) -> Path | None:
    """The PriceRunner-layout CSV `--data` names (auto: ../shared's when present), or None for
    the sample in data/; a clear FileNotFoundError when the file is not there. bench_train uses it too."""
    if which == "auto":
        which = "pricerunner" if PRICERUNNER.is_file() else "sample"
    if which == "sample":
        return None
    path = PRICERUNNER if which == "pricerunner" else Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"--data {which}: {path} not found; use --data sample, or the path of "
                                "pricerunner_aggregate.csv")
    return path


def load_titles(limit: int | None, data: str = "auto") -> tuple[list[str], str]:
    try:
        path = data_csv(data)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if path is not None:
        with path.open() as f:
            titles = [row[1] for row in csv.reader(f)]
        source = str(path)
    else:
        with (REPO / "data" / "products.csv").open() as f:
            titles = [row["text"] for row in csv.DictReader(f)]
        source = "data/products.csv"
    return (titles[:limit] if limit else titles), source


def alternate(runs: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Each run's times over `repeats` rounds, the runs alternating (drift of the machine's speed
    hits all of them), and each run's last output. bench_encode_host uses it too."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def add_encode_args(ap: argparse.ArgumentParser, repeats: int) -> None:
    """The options of every encoding benchmark: model, texts, batch shape, runs (bench_encode_host too)."""
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=repeats, help="alternating runs per side; the best of each is reported")
    ap.add_argument("--data", default="auto",
                    help="auto | pricerunner | sample | path of a CSV in PriceRunner's layout (title in column 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encode_args(ap, repeats=2)
    ap.add_argument("--precisions", default="auto",
                    help="embedft precisions (eval.precision) to time, comma-separated: auto, fp32, bf16")
    ap.add_argument("--deploy", action="store_true",
                    help="also time embedft.search.indexing.encode (index build/search) over the same ST model")
    ap.add_argument("--row-capped", action="store_true",
                    help="also time embedft with at most --batch-size rows per forward call (its batching before the "
                         "token bound on CUDA)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="afterwards, profile each side once on the first N texts (0: no profile)")
    args = ap.parse_args()
    if args.profile < 0:
        ap.error(f"--profile {args.profile}: give a number of texts (0 for no profile)")
    from embedft.config import PRECISIONS, ModelConfig

    precisions = [v.strip() for v in args.precisions.split(",") if v.strip()]
    unknown = set(precisions) - set(PRECISIONS)
    if unknown or not precisions:
        ap.error(f"--precisions {args.precisions!r}: use a comma-separated subset of {', '.join(PRECISIONS)}")
    first = precisions[0]  # "embedft" in the summary

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from embedft.modeling import chunking
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.families import resolve_model_path
    from embedft.modeling.runtime import encode_precision
    from embedft.search import indexing as deploy

    texts, source = load_titles(args.limit, args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    st = SentenceTransformer(resolve_model_path(args.model), device=device)
    st.max_seq_length = args.max_length
    enc = load_encoder(ModelConfig(name=args.model, max_length=args.max_length), device)

    def encode(precision: str, batch: list[str]):
        with encode_precision(enc, precision) as amp:  # as `embedft eval` does at eval.precision
            return enc.encode(batch, batch_size=args.batch_size, amp=amp)

    def st_encode(batch: list[str]):
        return st.encode(batch, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)

    def row_capped(batch: list[str]):
        own = chunking.forward_chunks
        chunking.forward_chunks = lambda lengths, batch_size, dev: chunking.length_chunks(
            lengths, batch_size, chunking.call_overhead(dev))[::-1]
        try:
            return encode(first, batch)
        finally:
            chunking.forward_chunks = own

    # Forward calls per encode: ST's transformer module and embedft's backbone are each called once per batch.
    counter, calls = [0], {}
    for module in (st[0], enc.backbone):
        module.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))

    def counted(name: str, run):
        def counted_run():
            counter[0] = 0
            out = run()
            calls[name] = counter[0]
            return out
        return counted_run

    warm = texts[:256]
    st_encode(warm)
    for v in precisions:
        encode(v, warm)

    # Alternate the sides so drift of the machine's speed hits all; keep each side's best.
    runs = {"st": lambda: st_encode(texts),
            **{v: (lambda v=v: encode(v, texts)) for v in precisions}}
    if args.row_capped:
        runs["row_capped"] = lambda: row_capped(texts)
    if args.deploy:
        runs["deploy"] = lambda: deploy.encode(st, texts, batch_size=args.batch_size)
    t_all, vecs = alternate({k: counted(k, run) for k, run in runs.items()}, args.repeats)
    t_st, t_var, ref = t_all["st"], {v: t_all[v] for v in precisions}, vecs["st"]
    t_ours, ours = t_var[first], vecs[first]
    times = {"sentence_transformers_seconds": [round(t, 2) for t in t_st], "embedft_seconds": [round(t, 2) for t in t_ours]}
    t_st, t_ours = min(t_st), min(t_ours)

    result = {
        "texts": len(texts), "unique_texts": len(set(texts)), "source": source, "model": args.model,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "sentence_transformers_texts_per_s": len(texts) / t_st, "embedft_texts_per_s": len(texts) / t_ours,
        "ratio_embedft_over_st": t_st / t_ours, **times, "max_abs_diff": float(np.abs(ref - ours).max()),
        "embedft_precision": first, "forward_calls": calls,
        "precisions": {v: {"texts_per_s": len(texts) / min(t_var[v]), "ratio_over_st": t_st / min(t_var[v]),
                         "seconds": [round(t, 2) for t in t_var[v]],
                         "max_abs_diff": float(np.abs(ref - vecs[v]).max())} for v in precisions},
    }
    for side in ("row_capped", "deploy"):
        if side in t_all:
            result[side] = {"texts_per_s": len(texts) / min(t_all[side]), "ratio_over_st": t_st / min(t_all[side]),
                            "seconds": [round(t, 2) for t in t_all[side]],
                            "max_abs_diff": float(np.abs(ref - vecs[side]).max())}
    print(f"sentence-transformers encode: {result['sentence_transformers_texts_per_s']:8.1f} texts/s")
    print(f"embedft encoder:              {result['embedft_texts_per_s']:8.1f} texts/s")
    print(f"ratio embedft / ST:           {result['ratio_embedft_over_st']:8.2f}x   max |diff| = {result['max_abs_diff']:.2e}")
    for v, r in result["precisions"].items():
        if len(precisions) > 1:
            print(f"  embedft {v:13s} {r['texts_per_s']:8.1f} texts/s  {r['ratio_over_st']:5.2f}x ST  "
                  f"max |diff| = {r['max_abs_diff']:.2e}")
    for side, label in (("row_capped", f"embedft ({first}), <= {args.batch_size} rows a call:"),
                        ("deploy", "embedft.search.indexing.encode (ST model):")):
        if side in result:
            r = result[side]
            print(f"{label} {r['texts_per_s']:8.1f} texts/s  {r['ratio_over_st']:5.2f}x ST  "
                  f"max |diff| = {r['max_abs_diff']:.2e}")
    print("forward calls per encode: " + ", ".join(f"{k} {v}" for k, v in calls.items()))
    if args.profile:
        if str(REPO / "benchmarks") not in sys.path:
            sys.path.insert(0, str(REPO / "benchmarks"))
        from profiling import markdown, profile_runs

        few = texts[: args.profile]
        try:  # a profiler that fails (no CUPTI access on a device, say) costs the profile, not the figures
            profiles = profile_runs({"sentence-transformers": lambda: st_encode(few),
                                     f"embedft ({first})": lambda: encode(first, few)}, device)
        except Exception as e:  # noqa: BLE001
            print(f"profile failed: {type(e).__name__}: {e}")
        else:
            print(f"\nProfile of one encode of {len(few)} texts per side (one unit = that call):\n")
            print(markdown(list(profiles.items())))
            result["profile"] = {"texts": len(few), **{k: p.as_dict() for k, p in profiles.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
