"""What the mined negatives' false-negative margin drops: the training split's intruders.

    python benchmarks/margin_intruders.py experiments/pricerunner-matching.yaml --adapter RUN/adapter \
        [--margins 0.05,0.1,0.2] [--samples 10] [-o K=V]

An intruder of an anchor is a text of another group (another product) that the model ranks inside the anchor's
top 10 above one of the anchor's own positives: what costs R_cap@10 at evaluation. Mining (`loss.hard_negatives`)
looks for negatives among the same nearest texts, but drops those scoring within `loss.mine_relative_margin` of the
anchor's best positive as likely false negatives. This embeds the training texts mining searches (the training
split less the validation products `train.val_fraction` carves; `-o` overrides must match the run's), and prints
for each margin how many intruders it drops, where each anchor's first candidate that survives the margin lies in
its ranking, and sample intruders with the anchor's weakest positive, so a reader can see what the margin throws
away: an item filed under two products, a colour variant, a generic title, or a true near twin. Grouped data only.
"""

from __future__ import annotations

import argparse

import numpy as np


def intruder_counts(docs: np.ndarray, src, margins: tuple[float, ...], k: int = 10, depth: int = 42) -> dict:
    """Per margin, the intruders (other-group texts in an anchor's top k scoring above its weakest positive) the
    margin drops (scoring above p - |p| * margin, p = the anchor's best positive: the miner's rule), and per
    margin the rank of each anchor's first eligible candidate among its `depth` nearest (depth: none there).
    `first_intruder` maps each anchor's row (position in np.unique(src.anchors)) that has one to (anchor, nearest
    intruder, its score, weakest positive, its score, best positive score), for printing samples.

    docs (T, D) L2-normalised vectors by text id of a grouped `PairSource` src (no query form)."""
    from embedft.evaluation.index import exact_search
    from embedft.training.mining import positive_scores

    anchors = np.unique(src.anchors)
    best = positive_scores(docs, docs, src)
    member_of = {int(t): m for m in src.members.values() for t in m.tolist()}
    scores, ranked = exact_search(docs, docs[anchors], min(depth, len(docs)))
    keys = src.keys
    out = {"anchors": len(anchors), "with_intruder": 0, "intruders": 0, "depth": depth,
           "dropped": {m: 0 for m in margins}, "first_eligible": {m: [] for m in margins}, "first_intruder": {}}
    for row, a in enumerate(anchors.tolist()):
        own_pos = member_of[a][member_of[a] != a]
        cand, s = ranked[row], scores[row]
        own = keys[a][keys[a] >= 0]
        other = ~np.isin(keys[cand], own).any(axis=1) & (cand != a) & (cand >= 0)
        for m in margins:
            ok = np.flatnonzero(other & (s <= best[a] - abs(best[a]) * m))
            out["first_eligible"][m].append(int(ok[0]) if len(ok) else depth)
        if len(own_pos) == 0:
            continue
        ps = docs[own_pos] @ docs[a]
        weakest = float(ps.min())
        intr = other[:k] & (s[:k] > weakest)
        if intr.any():
            out["with_intruder"] += 1
            out["intruders"] += int(intr.sum())
            j = int(np.flatnonzero(intr)[0])
            out["first_intruder"][row] = (a, int(cand[j]), float(s[j]), int(own_pos[ps.argmin()]), weakest,
                                          float(ps.max()))
            for m in margins:
                out["dropped"][m] += int((s[:k][intr] > best[a] - abs(best[a]) * m).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--adapter", help="adapter folder (default: the base model)")
    ap.add_argument("--margins", default="0.05,0.1,0.2", help="relative margins to count, comma-separated")
    ap.add_argument("--samples", type=int, default=10, help="sample intruders to print")
    ap.add_argument("-o", "--override", action="append", default=[], help="config override, as embedft train -o")
    args = ap.parse_args()

    import torch

    from embedft.config import load_config
    from embedft.data.batches import build_pair_source
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter
    from embedft.recipes.common import prepare_data
    from embedft.training.tokens import TokenCache

    cfg = load_config(args.experiment, args.override)
    if cfg.data.shape != "grouped":
        raise SystemExit(f"{args.experiment}: data.shape is {cfg.data.shape}; intruders are counted on grouped data")
    margins = tuple(float(m) for m in args.margins.split(","))
    src = build_pair_source(prepare_data(cfg).fit)
    encoder = load_encoder(cfg.model)
    if args.adapter:
        encoder = load_adapter(encoder, args.adapter)
    encoder.eval()
    ids = TokenCache(encoder, src.texts).docs(np.arange(len(src.texts)))
    docs = encoder.encode_ids(ids, device=torch.device("cpu"))
    got = intruder_counts(docs, src, margins)
    print(f"{args.adapter or 'base'}: {len(src.texts)} training texts, {got['anchors']} anchors; "
          f"{got['with_intruder']} anchors ({got['with_intruder'] / got['anchors']:.1%}) have an intruder in their "
          f"top 10, {got['intruders']} intruders in all")
    for m in margins:
        first = np.array(got["first_eligible"][m])
        share = got["dropped"][m] / max(got["intruders"], 1)
        ranks = np.percentile(first, [10, 25, 50, 75, 90]).tolist()
        print(f"  margin {m:g}: drops {got['dropped'][m]} of the intruders ({share:.1%}); first eligible candidate at "
              f"rank (10/25/50/75/90%) {ranks}, none within {got['depth']} for {np.mean(first >= got['depth']):.1%} "
              "of the anchors")
    # Samples: anchors in a seeded random order, each with its nearest intruder.
    rows = [r for r in np.random.default_rng(0).permutation(got["anchors"]).tolist() if r in got["first_intruder"]]
    for row in rows[:args.samples]:
        a, j, s, weak, weak_s, best_s = got["first_intruder"][row]
        print(f"\n{src.texts[a]!r}\n  weakest positive {weak_s:.3f} {src.texts[weak]!r}; best "
              f"{best_s:.3f}\n  intruder         {s:.3f} {src.texts[j]!r}")


if __name__ == "__main__":
    main()
