"""InfoNCE against values computed by hand."""

import math

import pytest
import torch

from embedft.losses import false_negative_mask, info_nce


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


def test_info_nce_matches_hand_computation():
    # Two anchors, two positives in 2-D. cos(a0,p0)=1, cos(a0,p1)=0, cos(a1,p0)=0.6, cos(a1,p1)=0.8.
    a = _unit([1.0, 0.0], [0.6, 0.8])
    p = _unit([1.0, 0.0], [0.6, 0.8])
    # cos matrix: [[1, .6], [.6, 1]]; with temperature 0.5 the logits are [[2, 1.2], [1.2, 2]].
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))  # same for both rows
    got = info_nce(a, p, temperature=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_hard_negatives_enter_the_denominator():
    a = _unit([1.0, 0.0])
    p = _unit([1.0, 0.0])
    n = _unit([0.0, 1.0], [1.0, 1.0])  # cos 0 and 1/sqrt(2)
    t = 0.1
    expected = -math.log(math.exp(10) / (math.exp(10) + math.exp(0) + math.exp(10 / math.sqrt(2))))
    assert info_nce(a, p, n, temperature=t).item() == pytest.approx(expected, rel=1e-12)


def test_false_negatives_are_masked_out():
    a = _unit([1.0, 0.0], [0.6, 0.8], [0.0, 1.0])
    p = _unit([1.0, 0.1], [0.5, 0.8], [0.1, 1.0])
    # Anchors 0 and 1 share a group: p1 is not a negative for a0, nor p0 for a1.
    keys = torch.tensor([7, 7, 9])
    ids = torch.tensor([0, 1, 2])
    cand_ids = torch.tensor([10, 11, 12])
    exclude = false_negative_mask(keys, keys, ids, cand_ids)
    t = 0.05
    got = info_nce(a, p, temperature=t, exclude=exclude)
    cos = a @ p.T
    rows = [
        -(cos[0, 0] / t) + torch.logsumexp(torch.stack([cos[0, 0], cos[0, 2]]) / t, 0),
        -(cos[1, 1] / t) + torch.logsumexp(torch.stack([cos[1, 1], cos[1, 2]]) / t, 0),
        -(cos[2, 2] / t) + torch.logsumexp(cos[2] / t, 0),
    ]
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-10)
    unmasked = info_nce(a, p, temperature=t)
    assert unmasked.item() > got.item()


def test_same_text_is_masked_even_without_keys():
    a = _unit([1.0, 0.0], [0.0, 1.0])
    p = _unit([0.0, 1.0], [0.0, 1.0])  # p0 is a different text; p1 has the same text id as anchor 0's ...
    keys = torch.tensor([-1, -1])
    exclude = false_negative_mask(keys, torch.tensor([-1, -1]), torch.tensor([5, 6]), torch.tensor([7, 5]))
    assert exclude.tolist() == [[False, True], [False, False]]
    got = info_nce(a, p, temperature=1.0, exclude=exclude)
    # row 0: only its positive remains -> loss 0; row 1: logits [1, 1] -> log 2.
    assert got.item() == pytest.approx(0.5 * (0.0 + math.log(2)), rel=1e-12)


def test_symmetric_term_averages_both_directions():
    a = _unit([1.0, 0.0], [0.6, 0.8])
    p = _unit([0.8, 0.6], [0.0, 1.0])
    t = 0.2
    fwd = info_nce(a, p, temperature=t)
    bwd = info_nce(p, a, temperature=t)
    assert info_nce(a, p, temperature=t, symmetric=True).item() == pytest.approx(0.5 * (fwd + bwd).item(), rel=1e-12)


def test_gradient_flows_to_both_sides():
    a = _unit([1.0, 0.2], [0.3, 0.8]).requires_grad_(True)
    p = _unit([0.9, 0.1], [0.1, 1.0]).requires_grad_(True)
    info_nce(a, p, temperature=0.05).backward()
    assert a.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def test_label_contrastive_matches_hand_computation():
    from embedft.losses import label_contrastive

    # Items 0 and 2 share label 0 (cosine 1 to each other, 0 to item 1); item 1 has no peer.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    loss = label_contrastive(emb, torch.tensor([0, 1, 0]), temperature=1.0)
    # For item 0: -log(e^1 / (e^0 + e^1)) = log(1 + e) - 1; item 2 the same; item 1 has no positive.
    assert float(loss) == pytest.approx(math.log(1 + math.e) - 1, abs=1e-6)
    loss.backward()
    assert emb.grad.abs().sum() > 0
    # Temperature divides the cosines: at 0.5 the logit gap is 2.
    assert float(label_contrastive(emb.detach(), torch.tensor([0, 1, 0]), temperature=0.5)) == \
        pytest.approx(math.log(1 + math.e ** 2) - 2, abs=1e-6)


def test_label_contrastive_is_zero_without_any_shared_label():
    from embedft.losses import label_contrastive

    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    loss = label_contrastive(emb, torch.arange(4))
    assert float(loss) == 0.0
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
