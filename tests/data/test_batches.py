"""Training batches: the pair source (keys, positives, negatives) and each epoch's batches."""

from __future__ import annotations

import numpy as np
import pytest

from embedft.config import TrainConfig
from embedft.data.batches import (
    _neighbour_runs,
    _other_member,
    anchors_per_epoch,
    build_pair_source,
    check_schedule,
    epoch_batches,
    group_pieces,
    steps_per_epoch,
)
from embedft.data.examples import Examples
from embedft.errors import ConfigError, DataError


def _pairs(rows) -> Examples:
    """Pairs examples, (query, positive, *hard negatives) per row, as `load_examples` gives them."""
    negs = [list(r[2:]) for r in rows] if len(rows[0]) > 2 else None
    return Examples("pairs", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows],
                    positives=[r[1] for r in rows], negatives=negs)


def _grouped_examples(n_groups=12, per=3, n_labels=3):
    rows = [(f"text {g}-{j}", f"g{g}", f"lab{g % n_labels}") for g in range(n_groups) for j in range(per)]
    return Examples("grouped", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows],
                    groups=[r[1] for r in rows], labels=[r[2] for r in rows])


def test_positives_share_the_anchor_key_and_are_other_texts():
    src = build_pair_source(_grouped_examples())
    batches = list(epoch_batches(src, 4, seed=3, epoch=0))
    assert len(batches) == steps_per_epoch(src, 4) == 36 // 4
    seen = np.concatenate([b.anchors for b in batches])
    assert sorted(seen.tolist()) == sorted(src.anchors.tolist())  # each anchor once per epoch
    for b in batches:
        assert (src.text_keys[b.positives] == b.anchor_keys).all()
        assert (b.positives != b.anchors).all()
        assert (src.text_keys[b.anchors] == b.anchor_keys).all()


def test_batches_are_a_pure_function_of_seed_and_epoch():
    src = build_pair_source(_grouped_examples())

    def run(seed, epoch):
        return [(b.anchors.tolist(), b.positives.tolist()) for b in epoch_batches(src, 4, seed=seed, epoch=epoch)]

    assert run(7, 0) == run(7, 0)
    assert run(7, 1) == run(7, 1)
    assert run(7, 0) != run(7, 1)
    assert run(7, 0) != run(8, 0)


def test_by_label_batches_hold_one_label_each():
    # 3 labels x 4 groups x 3 texts = 12 anchors per label; batch size 4 divides them exactly.
    src = build_pair_source(_grouped_examples(n_groups=12, per=3, n_labels=3))
    label_of = dict(zip(src.anchors.tolist(), src.batch_labels.tolist()))
    batches = list(epoch_batches(src, 4, seed=0, epoch=0, sampling="by_label"))
    assert len(batches) == 9
    assert all(len({label_of[a] for a in b.anchors.tolist()}) == 1 for b in batches)
    mixed = list(epoch_batches(src, 4, seed=0, epoch=0, sampling="random"))
    assert any(len({label_of[a] for a in b.anchors.tolist()}) > 1 for b in mixed)
    # The single-label batches are shuffled, not served label after label (that would be 2 changes).
    seq = [label_of[int(b.anchors[0])] for b in batches]
    assert sum(x != y for x, y in zip(seq, seq[1:])) > 2, seq


def test_by_label_with_leftovers_keeps_full_single_label_batches():
    # 6 labels x 5 anchors, batch size 4: one single-label batch per label; the 6 leftovers
    # (one per label) make one mixed batch and 2 are dropped.
    src = build_pair_source(_grouped_examples(n_groups=6, per=5, n_labels=6))
    label_of = dict(zip(src.anchors.tolist(), src.batch_labels.tolist()))
    batches = list(epoch_batches(src, 4, seed=1, epoch=2, sampling="by_label"))
    single = [b for b in batches if len({label_of[a] for a in b.anchors.tolist()}) == 1]
    assert len(single) == 6 and len(batches) == 7
    anchors = np.concatenate([b.anchors for b in batches])
    assert len(set(anchors.tolist())) == len(anchors)  # no anchor twice in an epoch


def _uneven_groups():
    # Group g has 2 + g % 5 texts (2..6); labels by g % 3.
    rows = [(f"t{g}-{j}", f"g{g}", f"lab{g % 3}") for g in range(20) for j in range(2 + g % 5)]
    return Examples("grouped", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows],
                    groups=[r[1] for r in rows], labels=[r[2] for r in rows])


@pytest.mark.parametrize("group_size", [2, 4])
def test_group_batches_cover_every_text_of_every_group_each_epoch(group_size):
    src = build_pair_source(_uneven_groups())
    per_epoch = sum(2 + g % 5 for g in range(20))  # every text, whatever the group_size
    batches = list(epoch_batches(src, 8, seed=0, epoch=0, sampling="groups", group_size=group_size))
    assert len(batches) == steps_per_epoch(src, 8, "groups", group_size) == per_epoch // 8
    assert anchors_per_epoch(src, "groups", group_size) == per_epoch
    flat = np.concatenate([b.anchors for b in batches])
    keys = np.concatenate([b.anchor_keys for b in batches])
    assert len(set(flat.tolist())) == len(flat) == per_epoch // 8 * 8  # no text twice; only the ragged tail left out
    assert (src.text_keys[flat] == keys).all()
    # A group's texts lie together in pieces of group_size .. 2*group_size-1 (a smaller group: one piece).
    starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1, len(keys)]
    for lo, hi in zip(starts[:-1], starts[1:]):
        size = len(src.members[int(keys[lo])])
        if hi == len(keys) or lo == 0:
            continue  # the first and last run may be cut by the epoch's edges
        assert min(size, group_size) <= hi - lo, (size, hi - lo)
    for b in batches:
        assert b.positives is None and b.negatives is None and len(b.anchors) == 8
        label_of = dict(zip(src.anchors.tolist(), src.batch_labels.tolist()))
        assert b.anchor_labels.tolist() == [label_of[a] for a in b.anchors.tolist()]
    # A fresh order each epoch, the same one for the same (seed, epoch).
    again = [b.anchors.tolist() for b in epoch_batches(src, 8, seed=0, epoch=0, sampling="groups")]
    assert again == [b.anchors.tolist() for b in epoch_batches(src, 8, seed=0, epoch=0, sampling="groups")]
    assert again != [b.anchors.tolist() for b in epoch_batches(src, 8, seed=0, epoch=1, sampling="groups")]


def test_group_pieces_by_hand():
    assert [p.tolist() for p in group_pieces(np.arange(3), 4)] == [[0, 1, 2]]  # fewer than group_size: one piece
    assert [p.tolist() for p in group_pieces(np.arange(5), 4)] == [[0, 1, 2, 3, 4]]  # never a lone text
    assert [p.tolist() for p in group_pieces(np.arange(9), 4)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert sorted(len(p) for p in group_pieces(np.arange(130), 4)) == [4] * 30 + [5] * 2


def test_labeled_group_batches_cover_the_data_with_many_labels_per_batch():
    # The case, scaled down: 20 labels x 40 texts, group_size 4, batch 32. An epoch used to
    # take 4 texts per label (80 of 800 texts, 2 steps); now every text, 25 steps.
    rows = [(f"q{lab}-{j}", f"intent{lab}") for lab in range(20) for j in range(40)]
    ex = Examples("labeled", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows],
                  groups=[r[1] for r in rows], labels=[r[1] for r in rows])
    src = build_pair_source(ex)
    batches = list(epoch_batches(src, 32, seed=0, epoch=0, sampling="groups", group_size=4))
    assert len(batches) == 25 == steps_per_epoch(src, 32, "groups", 4)
    assert sorted(np.concatenate([b.anchors for b in batches]).tolist()) == sorted(src.anchors.tolist())
    # Pieces of random labels: a batch holds several labels (negatives) and several texts of each (positives).
    n_labels = [len(np.unique(b.anchor_keys)) for b in batches]
    assert min(n_labels) >= 3 and np.mean(n_labels) > 5


def test_similar_groups_lay_neighbouring_groups_together():
    # Groups on a line: each group's nearest are its neighbours left and right. Runs follow
    # them, so consecutive groups in a run are adjacent on the line.
    n = 40
    neighbours = np.array([[j for j in sorted(range(n), key=lambda j: (abs(j - i), j)) if j != i][:4]
                           for i in range(n)])
    order = _neighbour_runs(np.random.default_rng(0).permutation(n), neighbours)
    assert sorted(order.tolist()) == list(range(n))  # every group once
    steps = np.abs(np.diff(order))
    assert (steps == 1).mean() > 0.7  # mostly walking along the line
    random_steps = np.abs(np.diff(np.random.default_rng(0).permutation(n)))
    assert (random_steps == 1).mean() < 0.2
    # Through epoch_batches: the groups of a similar_groups epoch follow the neighbour lists.
    src = build_pair_source(_uneven_groups())
    line = np.array([[j for j in sorted(range(20), key=lambda j: (abs(j - i), j)) if j != i][:4] for i in range(20)])
    for sampling, want in (("similar_groups", lambda f: f > 0.6), ("groups", lambda f: f < 0.4)):
        batches = list(epoch_batches(src, 8, seed=0, epoch=0, sampling=sampling, neighbours=line))
        assert len(batches) == steps_per_epoch(src, 8, sampling)
        keys = np.concatenate([b.anchor_keys for b in batches])
        seq = keys[np.r_[True, keys[1:] != keys[:-1]]]  # group order
        assert want((np.abs(np.diff(seq)) == 1).mean()), sampling


def test_group_batches_need_groups():
    src = build_pair_source(_pairs([(f"q{i}", f"p{i}") for i in range(8)]))
    with pytest.raises(DataError, match="batch_sampling=random"):
        list(epoch_batches(src, 4, seed=0, epoch=0, sampling="groups"))


def test_pairs_batches_use_the_given_positives_and_negatives():
    src = build_pair_source(_pairs([(f"q{i}", f"p{i}", f"n{i}", f"m{i}") for i in range(8)]))
    for b in epoch_batches(src, 4, seed=0, epoch=0, hard_negatives=2):
        for a, pos, negs in zip(b.anchors, b.positives, b.negatives):
            i = int(src.texts[a][1:])
            assert src.texts[pos] == f"p{i}"
            assert [src.texts[n] for n in negs] == [f"n{i}", f"m{i}"]
    b0 = next(epoch_batches(src, 4, seed=0, epoch=0, hard_negatives=1))
    assert b0.negatives.shape == (4, 1)
    assert next(epoch_batches(src, 4, seed=0, epoch=0)).negatives is None


def test_pair_source_rejects_data_without_positive_pairs():
    ex = Examples("grouped", "x.csv", np.arange(3) + 1, ["a", "b", "c"], groups=["1", "2", "3"])
    with pytest.raises(DataError, match="x.csv: no label or group has two different texts"):
        build_pair_source(ex)


def test_pair_source_rejects_data_with_a_single_label_or_group():
    # One label: every text is every other's positive, so no negatives and a loss of 0.
    ex = Examples("labeled", "x.csv", np.arange(4) + 1, ["a", "b", "c", "d"], groups=["x"] * 4, labels=["x"] * 4)
    with pytest.raises(DataError, match=r"x.csv: every training text with a positive has the same label \('x'\)"):
        build_pair_source(ex)
    # One trainable group next to singletons (kept by on_singleton=warn) is no better.
    ex = Examples("grouped", "y.csv", np.arange(4) + 1, ["a", "b", "c", "d"], groups=["1", "1", "2", "3"])
    with pytest.raises(DataError, match=r"y.csv: every training text with a positive has the same group \('1'\)"):
        build_pair_source(ex)
    # Pairs all sharing one positive, with no negative columns.
    ex = Examples("pairs", "z.csv", np.arange(3) + 1, ["a", "b", "c"], positives=["p"] * 3)
    with pytest.raises(DataError, match="z.csv: every query and positive is linked"):
        build_pair_source(ex)


def test_a_ragged_last_batch_is_dropped():
    # 10 anchors, batch size 4: two full batches; the 2 left over would have fewer negatives.
    src = build_pair_source(_grouped_examples(n_groups=5, per=2, n_labels=1))
    for sampling in ("random", "groups"):
        batches = list(epoch_batches(src, 4, seed=0, epoch=0, sampling=sampling))
        assert [len(b.anchors) for b in batches] == [4, 4] and steps_per_epoch(src, 4, sampling) == 2
    pairs = build_pair_source(_pairs([(f"q{i}", f"p{i}") for i in range(10)]))
    assert [len(b.anchors) for b in epoch_batches(pairs, 4, seed=0, epoch=0)] == [4, 4]


def test_other_member_is_uniform_over_the_rest_of_the_group():
    pool = np.array([0, 2, 4, 6, 8])  # sorted unique ids, as build_pair_source keeps them
    rng = np.random.default_rng(0)
    draws = np.array([_other_member(pool, 4, rng) for _ in range(4000)])
    values, counts = np.unique(draws, return_counts=True)
    assert values.tolist() == [0, 2, 6, 8]  # never the anchor
    assert (counts > 800).all() and (counts < 1200).all(), counts  # about 1000 each
    # Through epoch_batches: over epochs, an anchor of a 3-text group meets both other texts.
    src = build_pair_source(_grouped_examples(n_groups=4, per=3, n_labels=1))
    seen: dict[int, set] = {}
    for epoch in range(20):
        for b in epoch_batches(src, 4, seed=0, epoch=epoch):
            for a, pos in zip(b.anchors.tolist(), b.positives.tolist()):
                seen.setdefault(a, set()).add(pos)
    assert all(len(v) == 2 for v in seen.values()) and len(seen) == 12


def test_group_batches_give_a_large_group_fresh_pieces_each_epoch():
    # group_size 2 out of groups of up to 6 texts: which texts share a piece changes between epochs.
    src = build_pair_source(_uneven_groups())

    def pieces(epoch):
        out = set()
        for b in epoch_batches(src, 8, seed=0, epoch=epoch, sampling="groups", group_size=2):
            for k in np.unique(b.anchor_keys):
                out.add(tuple(sorted(b.anchors[b.anchor_keys == k].tolist())))
        return out

    assert pieces(0) != pieces(1)


def test_neighbour_runs_by_hand():
    # 0 -> 1 -> (0 is used, so its next nearest) 3 -> 2: a used neighbour is skipped, not a dead end.
    neighbours = np.array([[1, -1], [0, 3], [3, -1], [2, -1]])
    assert _neighbour_runs(np.array([0, 2, 1, 3]), neighbours).tolist() == [0, 1, 3, 2]
    # A chain 0 -> 1 -> ... -> 9 is cut after NEIGHBOUR_RUN = 8 groups; 9 then starts the next run.
    chain = np.array([[i + 1] for i in range(9)] + [[-1]])
    assert _neighbour_runs(np.array([0, 9] + list(range(1, 9))), chain).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]


def test_pairs_keys_cover_every_positive_of_a_query():
    # q0 has two positives: p1 must carry q0's key, or it would be an in-batch negative for (q0, p0).
    src = build_pair_source(_pairs([("q0", "p0"), ("q0", "p1"), ("q2", "p2"), ("q3", "p3")]))
    assert (src.text_keys[src.positives] == src.anchor_keys).all()
    assert src.anchor_keys[0] == src.anchor_keys[1] != src.anchor_keys[2] != src.anchor_keys[3]


def test_duplicate_texts_in_a_group_never_pair_with_themselves():
    # data.on_duplicate=warn keeps exact duplicates: "a" twice in group x, and in group z too.
    texts = ["a", "b", "a", "c", "d", "e", "a"]
    groups = ["x", "x", "x", "y", "y", "z", "z"]
    src = build_pair_source(Examples("grouped", "mem", np.arange(7) + 2, texts, groups=groups))
    for epoch in range(10):
        for b in epoch_batches(src, 7, seed=0, epoch=epoch):
            assert (b.positives != b.anchors).all()
        for b in epoch_batches(src, 6, seed=0, epoch=epoch, sampling="groups"):
            # "a" may sit in groups x and z at once (the loss masks it against itself), never twice for one group
            pairs = list(zip(b.anchors.tolist(), b.anchor_keys.tolist()))
            assert len(set(pairs)) == len(pairs)


def test_check_schedule_boundaries():
    src = build_pair_source(_grouped_examples())  # 36 anchors
    assert check_schedule(src, TrainConfig(batch_size=36, epochs=2, warmup_steps=2)) == 2  # a batch of all of them
    with pytest.raises(DataError, match="train.batch_size=37 is larger than the 36 training anchors"):
        check_schedule(src, TrainConfig(batch_size=37))
    with pytest.raises(ConfigError, match="train.warmup_steps=3 is longer than the 2 training steps"):
        check_schedule(src, TrainConfig(batch_size=36, epochs=2, warmup_steps=3))


def test_pair_sources_know_the_shape_auto_sampling_follows():
    rows = [(f"q{lab}-{j}", f"l{lab}") for lab in range(3) for j in range(10)]
    ex = Examples("labeled", "mem", np.arange(30) + 2, [r[0] for r in rows], groups=[r[1] for r in rows],
                  labels=[r[1] for r in rows])
    assert build_pair_source(ex).shape == "labeled"
    assert build_pair_source(_grouped_examples()).shape == "grouped"
    assert build_pair_source(_pairs([(f"q{i}", f"p{i}") for i in range(4)])).shape == "pairs"
