"""Cross-batch memory (`loss.memory`): a FIFO of past document embeddings whose rows join each anchor's
negatives, never of its own group or text; a run with it resumes exactly."""

import contextlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import _adapter, _encoder, toy_examples  # the tiny-model helpers of the loop's tests

from embedft.config import LossConfig, TrainConfig
from embedft.data.batches import Batch, build_pair_source
from embedft.training.loop import train
from embedft.training.losses import batch_loss, group_info_nce, memory_rows
from embedft.training.memory import NegativeMemory


def _rows(*ids, dim=4):
    return torch.tensor([[float(i)] * dim for i in ids])


def test_the_memory_keeps_the_newest_rows_and_round_trips_through_a_checkpoint():
    mem = NegativeMemory(5)
    assert mem.view() is None
    mem.push(_rows(0, 1, 2), np.array([10, 11, 12]), np.array([0, 1, 2]))
    mem.push(_rows(3, 4, 5, 6), np.array([13, 14, 15, 16]), np.array([3, 4, 5, 6]))
    emb, keys, ids = mem.view()
    assert ids.tolist() == [2, 3, 4, 5, 6] and keys.tolist() == [12, 13, 14, 15, 16]
    assert emb[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0] and not emb.requires_grad
    back = NegativeMemory(5)
    back.load(mem.state(), torch.device("cpu"))
    assert torch.equal(back.view()[0], emb) and back.view()[2].tolist() == ids.tolist()
    off = NegativeMemory(0)
    off.push(_rows(0), np.array([1]), np.array([0]))
    assert off.view() is None and off.state() == {}


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


def test_memory_rows_are_negatives_unless_of_the_anchors_group_or_text():
    # A group batch of texts 0, 1 (product 5) and 2 (product 9). In memory: a near twin of another
    # product (text 7, key 8, cos 0.9 to text 0), an older offer of product 5 (text 3) and text 0 itself.
    emb = _unit([1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 1.0, 0.0])
    text_keys = np.array([5, 5, 9, 5, -1, -1, -1, 8])
    batch = Batch(anchors=np.array([0, 1, 2]), positives=None, negatives=None, anchor_keys=np.array([5, 5, 9]))
    gather = {"q_inv": np.array([0, 1, 2]), "n_q": 3, "two_forms": False}
    cfg = LossConfig(temperature=0.5)
    plain = batch_loss(emb, batch, gather, text_keys, cfg)
    twin, same_group, same_text = _unit([0.9, 0.0, math.sqrt(1 - 0.81)]), _unit([1.0, 0.01, 0.0]), emb[:1]
    masked = {**gather, "memory": (torch.cat([same_group, same_text]), np.array([5, 5]), np.array([3, 0]))}
    assert batch_loss(emb, batch, masked, text_keys, cfg).item() == pytest.approx(plain.item(), rel=1e-12)
    mem = torch.cat([twin, same_group, same_text])
    with_twin = {**gather, "memory": (mem, np.array([8, 5, 5]), np.array([7, 3, 0]))}
    ok = torch.tensor([[True, False, False], [True, False, False], [True, True, True]])  # text 2: all negatives
    expected = group_info_nce(emb, emb, torch.tensor([5, 5, 9]), torch.eye(3, dtype=torch.bool), temperature=0.5,
                              extra=mem, extra_ok=ok)
    got = batch_loss(emb, batch, with_twin, text_keys, cfg)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12) and got.item() > plain.item()


def test_memory_rows_join_a_pairs_batch_as_negatives():
    # Pairs: anchor 0 -> positive 1, anchor 2 -> positive 3. A memory row of anchor 0's key is masked
    # for it and a negative of anchor 2 (another key); the same row as a plain negative gives the same loss.
    a = _unit([1.0, 0.0], [0.0, 1.0])
    p = _unit([0.9, 0.1], [0.1, 0.9])
    row = _unit([0.7, 0.7])
    emb = torch.cat([a, p])
    text_keys = np.array([1, 1, 2, 2, 1])
    batch = Batch(anchors=np.array([0, 2]), positives=np.array([1, 3]), negatives=None, anchor_keys=np.array([1, 2]))
    gather = {"q_inv": np.array([0, 1]), "d_inv": np.array([0, 1]), "n_q": 2, "valid": np.array([True, True])}
    cfg = LossConfig(temperature=0.1)
    got = batch_loss(emb, batch, {**gather, "memory": (row, np.array([1]), np.array([4]))}, text_keys, cfg)
    t = 0.1
    s = torch.cat([a @ p.T, a @ row.T], dim=1) / t  # (2, 3)
    row0 = -s[0, 0] + torch.logsumexp(s[0, :2], 0)  # the memory row shares anchor 0's key
    row1 = -s[1, 1] + torch.logsumexp(s[1], 0)
    assert got.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-12)


def test_memory_rows_are_the_steps_document_forms_of_its_unique_texts():
    batch = Batch(anchors=np.array([4, 2, 4]), positives=None, negatives=None, anchor_keys=np.array([1, 1, 1]))
    emb = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)  # rows 0-1 queries of 2, 4; rows 2-3 their docs
    rows, keys, ids = memory_rows(emb, batch, {"n_q": 2, "two_forms": True}, np.arange(10) * 10)
    assert ids.tolist() == [2, 4] and keys.tolist() == [20, 40] and rows[:, 0].tolist() == [2.0, 3.0]


@contextlib.contextmanager
def _killed_after_checkpoint(monkeypatch):
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


@pytest.mark.parametrize("sampling", ["groups", "random"])
def test_a_run_with_memory_changes_the_loss_and_resumes_exactly(tiny_bert_dir, tmp_path, monkeypatch, sampling):
    from embedft.training.checkpoint import load_checkpoint_arrays

    src = build_pair_source(toy_examples())  # 12 groups x 4 texts
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-2, warmup_ratio=0.0, log_every=1, batch_sampling=sampling)
    loss_cfg = LossConfig(temperature=0.1, memory=24)
    plain = train(_encoder(tiny_bert_dir, dropout=0.1), src, cfg, replace(loss_cfg, memory=0), tmp_path / "plain",
                  progress=False)
    full = _encoder(tiny_bert_dir, dropout=0.1)
    res = train(full, src, cfg, loss_cfg, tmp_path / "full", progress=False)
    # Step 1 has an empty memory (the same loss as without); later steps have more negatives.
    assert res.history[0]["train/loss"] == pytest.approx(plain.history[0]["train/loss"], rel=1e-6)
    assert all(a["train/loss"] > b["train/loss"] for a, b in zip(res.history[1:], plain.history[1:]))
    arrays = load_checkpoint_arrays(tmp_path / "full" / "checkpoint")
    assert arrays["memory_emb"].shape == (24, full.spec.hidden_size) and len(arrays["memory_ids"]) == 24

    killed = _encoder(tiny_bert_dir, dropout=0.1)
    with _killed_after_checkpoint(monkeypatch), pytest.raises(KeyboardInterrupt):
        train(killed, src, replace(cfg, checkpoint_every=2), loss_cfg, tmp_path / "resumed", progress=False)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed = _encoder(tiny_bert_dir, dropout=0.1)
    res2 = train(resumed, src, cfg, loss_cfg, tmp_path / "resumed", resume=True, progress=False)
    assert [h["train/loss"] for h in res2.history] == pytest.approx([h["train/loss"] for h in res.history], rel=1e-5)
    a, b = _adapter(full), _adapter(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
