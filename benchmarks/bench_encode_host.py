"""Host time of an encode outside the transformer: embedft's encoder vs SentenceTransformer.encode.

    python benchmarks/bench_encode_host.py [--model minilm] [--limit N] [--batch-size 128] [--repeats 3]
                                           [--data auto]

Both sides load the same model and encode the same texts (those of bench_encode.py), but the
transformer's forward is replaced on both by one that returns zeros of the right shape at once.
What is left is each side's own work around the model: tokenising, sorting and batching,
padding, pooling, normalising and gathering the vectors. A small model on a GPU waits for
exactly this host work (the model's own kernel launches are the same on both sides, as both
call the same Hugging Face model), so this is the part of a GPU encode that a CPU can measure.
The sides alternate --repeats times; each side's best time counts. Tokenising runs on one thread
unless TOKENIZERS_PARALLELISM=true is set (the tokenizers library's own default when unset).

A second table times the largest part of that host work, tokenising every text, both ways:
transformers' tokenizer call (what `Encoder.tokenize` did before) against `Encoder.tokenize`
(the Rust tokenizer called directly), their ids checked equal first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def null_forward(hidden_size: int):
    """A transformer forward that does no model work: zeros of shape (B, L, hidden)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    def forward(input_ids=None, attention_mask=None, **_):
        return BaseModelOutput(last_hidden_state=torch.zeros(*input_ids.shape, hidden_size))

    return forward


def main() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    from bench_encode import add_encode_args, alternate, load_titles

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encode_args(ap, repeats=3)
    args = ap.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from embedft.config import ModelConfig
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.families import resolve_model_path

    texts, source = load_titles(args.limit, args.data)
    st = SentenceTransformer(resolve_model_path(args.model), device="cpu")
    st.max_seq_length = args.max_length
    enc = load_encoder(ModelConfig(name=args.model, max_length=args.max_length), "cpu")
    st[0].auto_model.forward = null_forward(enc.spec.hidden_size)
    enc.backbone.forward = null_forward(enc.spec.hidden_size)

    sides = {
        "SentenceTransformer.encode": lambda: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                                                        normalize_embeddings=True),
        "embedft Encoder.encode": lambda: enc.encode(texts, batch_size=args.batch_size, amp=False),
    }
    times, vectors = alternate(sides, args.repeats)
    print(f"{len(texts):,} texts from {source}, {args.model}, batch {args.batch_size}, max length {args.max_length}, "
          f"transformer forward replaced by zeros; cpu ({os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}), torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}, best of {args.repeats}")
    print("| encoder | host seconds (best) | host ms per 1,000 texts | runs (s) |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.3f} | {1e6 * min(ts) / len(texts):.1f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    st_t, ours = (min(times[k]) for k in sides)
    print(f"embedft / ST host time: {ours / st_t:.2f} (below 1: embedft leaves the device waiting less)")

    def transformers_call():
        return enc.tokenizer(texts, truncation=True, max_length=enc.spec.max_length, padding=False,
                             return_attention_mask=False)["input_ids"]

    tokenizers = {"transformers' tokenizer call": transformers_call, "embedft Encoder.tokenize": lambda: enc.tokenize(texts)}
    tok_times, ids = alternate(tokenizers, args.repeats)
    if ids["transformers' tokenizer call"] != ids["embedft Encoder.tokenize"]:
        raise SystemExit("Encoder.tokenize gave other ids than the tokenizer call")
    print(f"\n| tokenising all {len(texts):,} texts | seconds (best) | runs (s) |\n|---|---|---|")
    for name, ts in tok_times.items():
        print(f"| {name} | {min(ts):.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    ref, fast = (min(tok_times[k]) for k in tokenizers)
    print(f"speed-up: {ref / fast:.2f}x (same ids)")
    print(json.dumps({"texts": len(texts), "host_seconds": {k: min(v) for k, v in times.items()},
                      "host_ratio": ours / st_t, "tokenize_seconds": {k: min(v) for k, v in tok_times.items()},
                      "max_abs_vector": {k: float(np.abs(v).max()) for k, v in vectors.items()}}))


if __name__ == "__main__":
    main()
