"""How much of a CPU training step's work is padding: one epoch of an experiment's batches, cut into
forward chunks as `training.step.embed` cuts them on the CPU.

    python benchmarks/batch_padding.py experiments/pricerunner-matching.yaml [--epoch 0] [-o KEY=VALUE ...]

Builds the experiment's training batches (its `train.batch_sampling`, batch size, group size and
seed; `similar_groups` needs an encoder's neighbours and is refused), tokenises each batch's unique
sequences with the model's tokenizer, cuts them with `length_chunks` (at most CPU_FORWARD_ROWS rows,
the CPU's call overhead) and prints the real tokens, the tokens with padding, their ratio and the
number of forward calls. It loads the model (`load_encoder`) for its tokenizer; nothing is run through it.
"""

from __future__ import annotations

import argparse

import numpy as np


def padding(experiment: str, epoch: int = 0, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """{"real", "padded", "ratio", "calls", "batches"} of one epoch of the experiment's batches."""
    from embedft.config import load_config, resolve_batch_sampling
    from embedft.data.batches import build_pair_source, epoch_batches
    from embedft.modeling.chunking import call_overhead, length_chunks
    from embedft.modeling.encoder import load_encoder
    from embedft.recipes.common import prepare_data
    from embedft.training.step import CPU_FORWARD_ROWS
    from embedft.training.tokens import TokenCache, batch_sequences

    cfg = load_config(experiment, list(overrides))
    sampling = resolve_batch_sampling(cfg.train.batch_sampling, cfg.data.shape)
    if sampling == "similar_groups":
        raise SystemExit("similar_groups lays batches by an encoder's neighbours: measure it with groups instead")
    src = build_pair_source(prepare_data(cfg).fit)
    cache = TokenCache(load_encoder(cfg.model), src.texts)
    real = padded = calls = batches = 0
    for batch in epoch_batches(src, cfg.train.batch_size, cfg.train.seed, epoch, sampling,
                               group_size=cfg.train.group_size):
        seqs, _ = batch_sequences(batch, cache)
        lengths = np.array([len(s) for s in seqs])
        chunks = length_chunks(lengths.tolist(), CPU_FORWARD_ROWS, call_overhead("cpu"))
        real += int(lengths.sum())
        padded += sum(len(c) * int(lengths[c].max()) for c in chunks)
        calls += len(chunks)
        batches += 1
    return {"real": real, "padded": padded, "ratio": padded / max(real, 1), "calls": calls, "batches": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("-o", "--override", action="append", default=[], help="KEY=VALUE, as embedft train's -o")
    args = ap.parse_args()
    r = padding(args.experiment, args.epoch, tuple(args.override))
    print(f"{r['batches']} batches, {r['calls']} forward calls: {r['real']:,} tokens, {r['padded']:,} with padding "
          f"(x{r['ratio']:.3f}, {100 * (r['ratio'] - 1):.1f}% padding)")


if __name__ == "__main__":
    main()
