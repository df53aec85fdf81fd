"""Hard-negative mining: planted hard negatives are found, planted false negatives (near duplicates
of the positive) are filtered, negatives reach group batches, refreshes use the current weights,
and a resumed run mines exactly what the uninterrupted one did."""

import contextlib
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_train import _adapter, _encoder, toy_examples  # the tiny-model helpers of the loop's tests

from embedft.config import LossConfig, TrainConfig
from embedft.data.batches import Batch, PairSource, build_pair_source
from embedft.data.examples import Examples
from embedft.training.loop import train
from embedft.training.losses import batch_loss, group_info_nce
from embedft.training.mining import StepVectors, mine_hard_negatives, mining_due
from embedft.training.tokens import TokenCache, batch_sequences

CPU = torch.device("cpu")


class VectorEncoder:
    """A test double for the encoder: each text embeds to a given unit vector, so the scores are planted."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.spec = SimpleNamespace(query_template=None)
        self.index = {t: i for i, t in enumerate(vectors)}
        v = np.array(list(vectors.values()), dtype=np.float32)
        self.vectors = v / np.linalg.norm(v, axis=1, keepdims=True)

    def tokenize(self, texts, is_query=False):
        return [[self.index[t]] for t in texts]

    def encode_ids(self, ids, device=None, **kw):
        return self.vectors[[i[0] for i in ids]]


def _unit(cos_e0: float, axis: int, dim: int = 8) -> list[float]:
    """A unit vector with cosine `cos_e0` to e0, the rest along e_axis."""
    v = [0.0] * dim
    v[0], v[axis] = cos_e0, math.sqrt(1 - cos_e0 ** 2)
    return v


# Anchor a1's positive a2 scores 0.80; dup (another group: a mislabelled near duplicate of a2) 0.85,
# above 95% of the positive (0.76): a false negative. hard (0.70) is the true hard negative, easy 0.10;
# b2, c2, d2 are orthogonal to a1 (score 0).
GROUPED = {
    "a1": _unit(1.0, 1), "a2": _unit(0.8, 1), "dup": _unit(0.85, 1), "b2": _unit(0.0, 4),
    "hard": _unit(0.7, 2), "c2": _unit(0.0, 5), "easy": _unit(0.1, 3), "d2": _unit(0.0, 6),
}
GROUP_OF = {"a1": "A", "a2": "A", "dup": "B", "b2": "B", "hard": "C", "c2": "C", "easy": "D", "d2": "D"}


def _grouped_source():
    texts = list(GROUPED)
    ex = Examples("grouped", "planted", np.arange(len(texts)) + 1, texts, groups=[GROUP_OF[t] for t in texts],
                  labels=None)
    src = build_pair_source(ex)
    enc = VectorEncoder({t: GROUPED[t] for t in src.texts})
    return src, enc, TokenCache(enc, src.texts)


def _mined_for(src, mined, text, **kw):
    return [src.texts[i] if i >= 0 else None for i in mined[src.texts.index(text)]]


def test_mining_finds_the_planted_hard_negative_and_filters_the_near_duplicate_of_the_positive():
    src, enc, cache = _grouped_source()
    mine = lambda **kw: mine_hard_negatives(enc, src, cache, 2, CPU, **kw)  # noqa: E731
    # Without the filter the near duplicate of the positive comes first: a false negative.
    assert _mined_for(src, mine(), "a1") == ["dup", "hard"]
    # relative_margin 0.05 (the default): drop above 0.80 - 0.04 = 0.76, so dup goes and hard stays.
    assert _mined_for(src, mine(relative_margin=0.05), "a1") == ["hard", "easy"]
    # absolute_margin 0.2: drop above 0.60, which removes hard as well.
    assert _mined_for(src, mine(absolute_margin=0.2), "a1")[0] == "easy"
    # range_min skips the nearest eligible candidate (sentence-transformers' range_min).
    assert _mined_for(src, mine(range_min=1), "a1") == ["hard", "easy"]
    # range_max bounds the search: a1's 4 nearest texts are itself, dup, its positive a2 and hard, so easy (5th) is
    # out of reach and the second slot is padded; 2 reach dup alone, which the margin drops: nothing is mined.
    assert _mined_for(src, mine(relative_margin=0.05, range_max=4), "a1") == ["hard", None]
    assert _mined_for(src, mine(relative_margin=0.05, range_max=2), "a1") == [None, None]
    # Never the anchor's own group, never the anchor itself, for any anchor.
    mined = mine(relative_margin=0.05)
    for t in src.texts:
        got = [m for m in mined[src.texts.index(t)] if m >= 0]
        assert got and all(GROUP_OF[src.texts[m]] != GROUP_OF[t] for m in got), t


def test_the_default_search_reaches_past_a_label_that_gathered_around_its_anchor():
    # Labeled data after some training: label A's 60 texts all score 0.95-0.99 with anchor a0, above any other
    # label's text; b0 (0.5) is the nearest text of another label. The explicit depth 42 (what the default was:
    # 10 x 1 + 32 nearest texts of any label) holds only A's texts, so a0 goes without a negative; the default
    # counts 42 texts of other labels past A's own and finds b0. The margin still applies (A's best positive 0.99).
    vec = {"a0": _unit(1.0, 1)}
    vec.update({f"a{i}": _unit(0.95 + 0.04 * i / 60, 1 + i % 5) for i in range(1, 61)})
    vec.update({"b0": _unit(0.5, 6), **{f"b{i}": _unit(0.0, 7) for i in range(1, 11)}})
    texts = list(vec)
    ex = Examples("labeled", "planted", np.arange(len(texts)) + 1, texts, groups=[t[0] for t in texts],
                  labels=[t[0] for t in texts])
    src = build_pair_source(ex)
    enc = VectorEncoder({t: vec[t] for t in src.texts})
    cache = TokenCache(enc, src.texts)
    mine = lambda **kw: mine_hard_negatives(enc, src, cache, 1, CPU, relative_margin=0.05, **kw)  # noqa: E731
    assert _mined_for(src, mine(range_max=42), "a0") == [None]
    assert _mined_for(src, mine(), "a0") == ["b0"]
    assert _mined_for(src, mine(range_max=100), "a0") == ["b0"]  # an explicit depth past the label does too
    mined = mine()  # every anchor of A finds a text of B, none its own label's
    assert all(src.texts[mined[src.texts.index(t), 0]].startswith("b") for t in texts if t.startswith("a"))


def test_the_default_search_is_exact_however_large_the_anchors_own_label():
    # Label A's 1,500 texts all score above every text of B with A's anchors (a full category after training):
    # a depth search of any fixed reach past them (the default reached 1,024 of an anchor's own texts before)
    # leaves some anchors without a negative. The default search leaves A's texts out and finds B's nearest text
    # for every anchor of A, and for B's anchors A's nearest text.
    rng = np.random.default_rng(0)
    a = np.hstack([np.ones((1500, 1)), 0.05 * rng.standard_normal((1500, 7))])
    b = np.hstack([np.full((20, 1), 0.3), np.ones((20, 1)), 0.05 * rng.standard_normal((20, 6))])
    b[0, :2] = [0.6, 0.8]  # b0: B's text nearest to A
    vec = {**{f"a{i}": v.tolist() for i, v in enumerate(a)}, **{f"b{i}": v.tolist() for i, v in enumerate(b)}}
    texts = list(vec)
    ex = Examples("labeled", "planted", np.arange(len(texts)) + 1, texts, groups=[t[0] for t in texts],
                  labels=[t[0] for t in texts])
    src = build_pair_source(ex)
    enc = VectorEncoder({t: vec[t] for t in src.texts})
    mined = mine_hard_negatives(enc, src, TokenCache(enc, src.texts), 1, CPU, relative_margin=None)
    assert {got for t in texts if t[0] == "a" for got in _mined_for(src, mined, t)} == {"b0"}
    assert {got[0] for t in texts if t[0] == "b" for got in _mined_for(src, mined, t)} == {"a"}
    assert _mined_for(src, mine_hard_negatives(enc, src, TokenCache(enc, src.texts), 1, CPU, relative_margin=None,
                                               range_max=1024), "a0") == [None]  # an explicit depth counts A's texts


def test_a_text_of_two_groups_is_mined_only_for_the_other_groups():
    # "twin" is one title on two products, A and B (as 396 PriceRunner training titles are). The pair source keeps
    # one key per text (B's, the last), so a key test took twin, a member of a1's own group, for a1's nearest
    # negative of another group, and a1 for twin's. Mining tests every key of both texts: twin is no negative of
    # A's or B's texts, nor they of twin, and it is a negative of C's like any other text.
    vec = {"a1": _unit(1.0, 1), "a2": _unit(0.8, 1), "twin": _unit(0.9, 2), "b2": _unit(0.0, 4),
           "hard": _unit(0.7, 3), "c2": _unit(0.0, 5)}
    rows = [("a1", "A"), ("a2", "A"), ("twin", "A"), ("twin", "B"), ("b2", "B"), ("hard", "C"), ("c2", "C")]
    ex = Examples("grouped", "planted", np.arange(len(rows)) + 1, [t for t, _ in rows], groups=[g for _, g in rows])
    src = build_pair_source(ex)
    assert [src.texts[i] for i in np.flatnonzero((src.keys >= 0).sum(axis=1) > 1)] == ["twin"]
    enc = VectorEncoder({t: vec[t] for t in src.texts})
    mine = lambda n: mine_hard_negatives(enc, src, TokenCache(enc, src.texts), n, CPU, relative_margin=None)  # noqa: E731
    assert _mined_for(src, mine(1), "a1") == ["hard"]
    assert _mined_for(src, mine(1), "twin") == ["hard"]  # a1 (0.90) and a2 are of twin's product A
    assert _mined_for(src, mine(2), "hard") == ["a1", "twin"]  # twin (0.63) is of neither product of C
    twin, mined = src.texts.index("twin"), mine(2)
    assert all(twin not in mined[src.texts.index(t)].tolist() for t in ("a1", "a2", "b2"))


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_text_of_two_groups_is_no_in_batch_negative_of_either(symmetric):
    # "twin" is of products A and B; `text_keys` keeps B's key only. In a pair batch twin, drawn as b2's positive,
    # was a negative of a1 (A), and in a group batch where it was laid under B, a negative of a1 and a2.
    # Each row's loss by hand: -s(pos) + logsumexp(s(pos), s(negatives)).
    vec = {"a1": _unit(1.0, 1), "a2": _unit(0.6, 2), "twin": _unit(0.9, 3), "b2": _unit(0.3, 4)}
    rows = [("a1", "A"), ("a2", "A"), ("twin", "A"), ("twin", "B"), ("b2", "B")]
    ex = Examples("grouped", "planted", np.arange(len(rows)) + 1, [t for t, _ in rows], groups=[g for _, g in rows])
    src = build_pair_source(ex)
    enc = VectorEncoder({t: vec[t] for t in src.texts})
    cache = TokenCache(enc, src.texts)
    i = {t: src.texts.index(t) for t in vec}
    kA, kB = src.anchor_keys[0], src.anchor_keys[-1]
    assert sorted(src.keys[i["twin"]].tolist()) == sorted([kA, kB]) and src.text_keys[i["twin"]] == kB
    s = {(x, y): float(np.dot(vec[x], vec[y]) / np.linalg.norm(vec[x]) / np.linalg.norm(vec[y])) / 0.05
         for x in vec for y in vec}

    def row(a, p, negs):
        return -s[a, p] + float(torch.logsumexp(torch.tensor([s[a, p]] + [s[a, n] for n in negs]), 0))

    def loss_of(batch):
        seqs, gather = batch_sequences(batch, cache)
        return float(batch_loss(torch.as_tensor(enc.encode_ids(seqs)), batch, gather, src.keys,
                                LossConfig(temperature=0.05, symmetric=symmetric, label_weight=0.0)))

    pair = Batch(np.array([i["a1"], i["b2"]]), np.array([i["a2"], i["twin"]]), None, np.array([kA, kB]))
    want = (row("a1", "a2", []) + row("b2", "twin", ["a2"])) / 2  # twin is no negative of a1
    if symmetric:  # positives -> anchors: a1 is no negative of twin
        want = 0.5 * want + 0.5 * (row("a2", "a1", ["b2"]) + row("twin", "b2", [])) / 2
    assert loss_of(pair) == pytest.approx(want, rel=1e-5)

    group = Batch(np.array([i["a1"], i["a2"], i["twin"], i["b2"]]), None, None, np.array([kA, kA, kB, kB]))
    want = (row("a1", "a2", ["b2"]) + row("a2", "a1", ["b2"]) + row("twin", "b2", []) + row("b2", "twin", ["a1", "a2"]))
    assert loss_of(group) == pytest.approx(want / 4, rel=1e-5)


def test_mining_from_step_vectors_searches_them_and_encodes_only_the_other_texts():
    src, enc, cache = _grouped_source()
    seen = StepVectors(len(src.texts), 8, two_forms=False)
    # A training step embedded a1 and easy, with weights that have moved easy to 0.75 of a1: above the
    # planted hard negative (0.70), below the false-negative filter (95% of the positive's 0.80).
    ids = np.array([src.texts.index("easy"), src.texts.index("a1")])
    seen.record({"n_q": 2, "q_ids": ids, "two_forms": False}, torch.tensor([_unit(0.75, 3), _unit(1.0, 1)]))
    encoded, real = [], enc.encode_ids
    enc.encode_ids = lambda ids, **kw: (encoded.extend(i[0] for i in ids), real(ids))[1]
    mined = mine_hard_negatives(enc, src, cache, 1, CPU, relative_margin=0.05, seen=seen)
    assert _mined_for(src, mined, "a1") == ["easy"]
    assert sorted(encoded) == sorted(set(range(len(src.texts))) - set(ids.tolist()))
    encoded.clear()
    seen.forget()  # after a mining, only what later steps embed is reused
    assert _mined_for(src, mine_hard_negatives(enc, src, cache, 1, CPU, relative_margin=0.05, seen=seen),
                      "a1") == ["hard"]
    assert sorted(encoded) == list(range(len(src.texts)))


def test_step_vectors_keep_each_row_in_its_form():
    sv = StepVectors(6, 2, two_forms=True)
    emb = torch.arange(10.0).reshape(5, 2)
    # A group batch: texts 0 and 3 as queries (rows 0-1), as documents (rows 2-3), mined negative 5 (row 4).
    sv.record({"n_q": 2, "q_ids": np.array([0, 3]), "two_forms": True, "neg_start": 4, "neg_ids": np.array([5])},
              emb)
    assert sv.queries[[0, 3]].tolist() == emb[:2].tolist() and sv.docs[[0, 3, 5]].tolist() == emb[2:].tolist()
    assert sv.query_known.tolist() == [1, 0, 0, 1, 0, 0] and sv.doc_known.tolist() == [1, 0, 0, 1, 0, 1]
    # A pairs batch: query 1 (row 0), documents 2 and 4 (rows 1-2).
    sv.record({"n_q": 1, "q_ids": np.array([1]), "d_ids": np.array([2, 4])}, emb[:3] + 100)
    assert sv.queries[1].tolist() == (emb[0] + 100).tolist() and sv.docs[[2, 4]].tolist() == (emb[1:3] + 100).tolist()
    assert sv.query_known.sum() == 3 and sv.doc_known.sum() == 5
    fresh = StepVectors(6, 2, two_forms=True)
    fresh.load(sv.state())  # what a checkpoint keeps
    assert all(np.array_equal(v, fresh.state()[k]) for k, v in sv.state().items())


def test_mining_pairs_uses_each_rows_positive_and_only_documents_as_candidates():
    # q1's positive p1 scores 0.80; dup (q3's positive) 0.85: filtered; p2 0.50 is the hard negative;
    # q2 scores 0.90 but is a query, never a document: not a candidate.
    vec = {"q1": _unit(1.0, 1), "p1": _unit(0.8, 1), "q2": _unit(0.9, 2), "p2": _unit(0.5, 3),
           "q3": _unit(0.0, 4), "dup": _unit(0.85, 1)}
    texts = list(vec)
    src = PairSource(texts, anchors=np.array([0, 2, 4]), anchor_keys=np.array([0, 1, 2]),
                     text_keys=np.array([0, 0, 1, 1, 2, 2]), members=None, positives=np.array([1, 3, 5]),
                     negatives=None, batch_labels=None)
    enc = VectorEncoder(vec)
    cache = TokenCache(enc, texts)
    assert _mined_for(src, mine_hard_negatives(enc, src, cache, 1, CPU, relative_margin=None), "q1") == ["dup"]
    assert _mined_for(src, mine_hard_negatives(enc, src, cache, 1, CPU, relative_margin=0.05), "q1") == ["p2"]
    assert (mine_hard_negatives(enc, src, cache, 1, CPU)[[1, 3, 5]] == -1).all()  # no row for non-anchors


def test_group_loss_takes_mined_negatives_as_extra_candidates():
    # Two groups of two texts, one extra candidate: by hand, for pair (0, 1) of anchor 0.
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.3], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    extra = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1]]), dim=1)
    keys = torch.tensor([0, 0, 1, 1])
    same = torch.eye(4, dtype=torch.bool)
    t = 0.1
    base = group_info_nce(emb, emb, keys, same, temperature=t)
    ok = torch.ones(4, 1, dtype=torch.bool)
    with_extra = group_info_nce(emb, emb, keys, same, temperature=t, extra=extra, extra_ok=ok)
    masked = group_info_nce(emb, emb, keys, same, temperature=t, extra=extra, extra_ok=~ok)
    assert masked == pytest.approx(float(base))
    s = emb @ torch.cat([emb, extra]).T / t  # (4, 5)
    per_anchor = []
    for i, p in ((0, 1), (1, 0), (2, 3), (3, 2)):
        negs = [j for j in range(5) if j < 4 and keys[j] != keys[i]] + [4]
        per_anchor.append(-(s[i, p] - torch.logsumexp(torch.stack([s[i, p], *s[i, negs]]), 0)))
    assert float(with_extra) == pytest.approx(float(torch.stack(per_anchor).mean()), rel=1e-5)
    assert float(with_extra) > float(base)

    # Through batch_sequences and batch_loss: a group batch with negatives embeds them (document form)
    # and a negative of the anchor's own group is masked, never a negative.
    src, enc, cache = _grouped_source()
    ids = np.array([src.texts.index(t) for t in ("a1", "a2", "easy", "d2")])
    keys_np = src.text_keys[ids]
    own = src.texts.index("dup"), src.texts.index("a2")  # dup: a negative; a2: own group for a1/a2
    batch = Batch(ids, None, np.array([[own[0]], [own[1]], [-1], [-1]]), keys_np)
    seqs, gather = batch_sequences(batch, cache)
    assert len(seqs) == 4 + 2 and list(gather["neg_ids"]) == sorted(own)
    emb_b = torch.as_tensor(enc.encode_ids(seqs))
    loss = batch_loss(emb_b, batch, gather, src.text_keys, LossConfig(temperature=t))
    plain = batch_loss(emb_b[:4], replace(batch, negatives=None), batch_sequences(replace(batch, negatives=None),
                                                                                  cache)[1], src.text_keys,
                       LossConfig(temperature=t))
    assert float(loss) > float(plain)  # dup entered a1's and a2's denominators

    # A batch whose anchors all went without a mined negative (a wide mine_relative_margin leaves most offers
    # without one): the loss of the batch without negatives, not a crash.
    none = replace(batch, negatives=np.full((4, 1), -1))
    seqs_n, gather_n = batch_sequences(none, cache)
    assert len(seqs_n) == 4 and len(gather_n["neg_ids"]) == 0
    for keys_t in (src.text_keys, src.text_keys[:, None]):  # (T,) and (T, W) keys
        assert float(batch_loss(torch.as_tensor(enc.encode_ids(seqs_n)), none, gather_n, keys_t,
                                LossConfig(temperature=t))) == pytest.approx(float(plain))


def test_mining_due_by_steps_or_epochs():
    assert [s for s in range(1, 9) if mining_due(3, s, False)] == [3, 6]
    assert not mining_due(3, 3, True) and not mining_due(None, 4, False) and not mining_due(None, 4, True)
    assert mining_due("epoch", 8, True) and not mining_due("epoch", 8, False)


@contextlib.contextmanager
def _killed_after_checkpoint(monkeypatch):
    """The run dies right after writing its first checkpoint."""
    import embedft.training.loop as T

    real_save = T.save_checkpoint

    def save_then_die(path, *a, **k):
        real_save(path, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(T, "save_checkpoint", real_save)


def _spy_mining(monkeypatch):
    """Record, per mining call, a fingerprint of the LoRA weights it mined with."""
    import embedft.training.mining as M

    calls, real = [], M.mine_hard_negatives

    def spy(encoder, *a, **k):
        calls.append(sum(float(v.double().sum()) for v in _adapter(encoder).values()))
        return real(encoder, *a, **k)

    monkeypatch.setattr(M, "mine_hard_negatives", spy)
    return calls


@pytest.mark.parametrize("sampling, mine_every, n_mined, from_steps", [
    ("groups", 2, 5, False), ("random", 4, 3, False), ("similar_groups", "epoch", 3, False),
    ("groups", 2, 5, True), ("random", "epoch", 3, True)])
def test_refreshed_negatives_use_the_current_weights_and_resume_exactly(tiny_bert_dir, tmp_path, monkeypatch,
                                                                        sampling, mine_every, n_mined, from_steps):
    from embedft.training.checkpoint import load_checkpoint_arrays

    src = build_pair_source(toy_examples())  # 12 groups x 4 texts
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-2, warmup_ratio=0.0, log_every=1, batch_sampling=sampling)
    loss_cfg = LossConfig(temperature=0.1, hard_negatives=2, mine_every=mine_every, mine_from_steps=from_steps)
    calls = _spy_mining(monkeypatch)
    full = _encoder(tiny_bert_dir, dropout=0.1)
    res = train(full, src, cfg, loss_cfg, tmp_path / "full", progress=False)
    assert res.steps == 9  # 48 anchors / 16 = 3 steps an epoch
    # Mined at the start and at each refresh (every 2 steps / 4 steps / each later epoch), each time
    # with the weights as they were then (the weights change between refreshes).
    assert len(calls) == n_mined and len(set(calls)) == n_mined
    arrays = load_checkpoint_arrays(tmp_path / "full" / "checkpoint")
    neg = arrays["negatives"]
    rows = np.unique(src.anchors)
    assert neg.shape == (len(src.texts), 2) and (neg[rows] >= 0).all()
    assert (src.text_keys[neg[rows]] != src.text_keys[rows][:, None]).all()  # never of the anchor's group
    assert ("neighbours" in arrays) == (sampling == "similar_groups")
    # loss.mine_from_steps: the checkpoint keeps the steps' vectors since the last refresh, as float16.
    assert ("seen_docs" in arrays) == from_steps
    if from_steps:
        assert arrays["seen_docs"].dtype == np.float16 and arrays["seen_doc_known"].any()

    killed = _encoder(tiny_bert_dir, dropout=0.1)
    with _killed_after_checkpoint(monkeypatch), pytest.raises(KeyboardInterrupt):
        train(killed, src, replace(cfg, checkpoint_every=2), loss_cfg, tmp_path / "resumed", progress=False)
    progress = json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())
    assert (progress["step"], progress["batches_done"]) == (2, 2)  # mid-epoch, after step 2's refresh if any

    resumed = _encoder(tiny_bert_dir, dropout=0.1)  # a fresh process: fresh weights, state from disk
    res = train(resumed, src, cfg, loss_cfg, tmp_path / "resumed", resume=True, progress=False)
    assert [h["step"] for h in res.history] == list(range(1, 10))
    a, b = _adapter(full), _adapter(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    again = load_checkpoint_arrays(tmp_path / "resumed" / "checkpoint")
    assert again.keys() == arrays.keys() and all(np.array_equal(again[k], arrays[k]) for k in arrays)


def test_a_checkpoint_without_mining_state_mines_from_the_starting_weights(tiny_bert_dir, tmp_path, monkeypatch):
    """Checkpoints written before mining was saved: the run mines from the starting weights, as it then did."""
    src = build_pair_source(toy_examples())
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-2, warmup_ratio=0.0, log_every=1)
    loss_cfg = LossConfig(temperature=0.1, hard_negatives=1)
    full = _encoder(tiny_bert_dir)
    train(full, src, cfg, loss_cfg, tmp_path / "full", progress=False)
    killed = _encoder(tiny_bert_dir)
    with _killed_after_checkpoint(monkeypatch), pytest.raises(KeyboardInterrupt):
        train(killed, src, cfg, loss_cfg, tmp_path / "old", progress=False)  # at the end of epoch 1
    (tmp_path / "old" / "checkpoint" / "arrays.npz").unlink()
    calls = _spy_mining(monkeypatch)
    resumed = _encoder(tiny_bert_dir)
    train(resumed, src, cfg, loss_cfg, tmp_path / "old", resume=True, progress=False)
    assert len(calls) == 1
    a, b = _adapter(full), _adapter(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

