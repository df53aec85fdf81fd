"""InfoNCE against values computed by hand."""

import math

import pytest
import torch

from embedft.training.losses import false_negative_mask, info_nce


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
    from embedft.training.losses import label_contrastive

    # Items 0 and 2 share label 0 (cosine 1 to each other, 0 to item 1); item 1 has no peer.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    loss = label_contrastive(emb, torch.tensor([0, 1, 0]), temperature=1.0)
    # For item 0: -log(e^1 / (e^0 + e^1)) = log(1 + e) - 1; item 2 the same; item 1 has no positive.
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.e) - 1, abs=1e-6)
    loss.backward()
    assert emb.grad.abs().sum() > 0
    # Temperature divides the cosines: at 0.5 the logit gap is 2.
    assert float(label_contrastive(emb.detach(), torch.tensor([0, 1, 0]), temperature=0.5)) == \
        pytest.approx(math.log(1 + math.e ** 2) - 2, abs=1e-6)


def test_label_contrastive_is_zero_without_any_shared_label():
    from embedft.training.losses import label_contrastive

    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    loss = label_contrastive(emb, torch.arange(4))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_group_info_nce_matches_hand_computation():
    from embedft.training.losses import group_info_nce

    # Texts 0 and 1 are one product, text 2 another. cos: (0,1)=0.8, (0,2)=0, (1,2)=0.6.
    emb = _unit([1.0, 0.0], [0.8, 0.6], [0.0, 1.0])
    keys = torch.tensor([5, 5, 9])
    same = torch.eye(3, dtype=torch.bool)
    t = 0.5
    # Each pair against its anchor's negatives only: row 0 -> pair (0,1) vs negative 2, row 1 -> (1,0)
    # vs 2, row 2 has no pair.
    row0 = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + math.exp(0.0 / t)))
    row1 = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + math.exp(0.6 / t)))
    got = group_info_nce(emb, emb, keys, same, temperature=t)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_group_info_nce_never_uses_a_positive_as_a_negative():
    from embedft.training.losses import group_info_nce

    # Random batch of 3 products x 3 texts against a brute-force reference: each pair (i, j) of one
    # product competes only with texts of other products, never with the third member.
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)
    keys = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    t = 0.1
    s = e @ e.T / t
    rows = []
    for i in range(9):
        negs = [s[i, n] for n in range(9) if keys[n] != keys[i]]
        pairs = [-s[i, j] + torch.logsumexp(torch.stack([s[i, j], *negs]), 0) for j in range(9)
                 if j != i and keys[j] == keys[i]]
        rows.append(torch.stack(pairs).mean())
    got = group_info_nce(e, e, keys, torch.eye(9, dtype=torch.bool), temperature=t)
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-12)
    # Moving a third member onto the anchor leaves the (0, 1) and (1, 0) terms unchanged.
    moved = e.clone()
    moved[2] = e[0]
    for i, j in ((0, 1), (1, 0)):
        def term(x):
            sx = x @ x.T / t
            return -sx[i, j] + torch.logsumexp(torch.cat([sx[i, j:j + 1], sx[i, 3:]]), 0)
        assert term(moved).item() == pytest.approx(term(e).item(), rel=1e-12)


def test_group_info_nce_masks_the_same_text_in_two_forms():
    from embedft.training.losses import group_info_nce

    # Query and document forms differ (a decoder with an instruction): text i's own document is
    # neither its positive nor its negative.
    q = _unit([1.0, 0.0], [0.0, 1.0], [0.6, 0.8])
    d = _unit([1.0, 0.1], [0.2, 1.0], [0.5, 0.9])
    keys = torch.tensor([3, 3, 4])
    t = 0.5
    s = q @ d.T / t
    row0 = -s[0, 1] + torch.logaddexp(s[0, 1], s[0, 2])  # own document s[0, 0] is left out
    row1 = -s[1, 0] + torch.logaddexp(s[1, 0], s[1, 2])
    got = group_info_nce(q, d, keys, torch.eye(3, dtype=torch.bool), temperature=t)
    assert got.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-12)
    # No text with a positive: 0, with a gradient of zeros rather than NaN.
    qq = q.clone().requires_grad_(True)
    loss = group_info_nce(qq, d, torch.tensor([1, 2, 3]), torch.eye(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(qq.grad, torch.zeros_like(qq))


def test_info_nce_against_a_brute_force_loop():
    # Random 3 x 4 batch with hard negatives and asymmetric masks, against a plain loop over rows.
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
               for _ in range(3))
    t = 0.1
    cands = torch.cat([p, n])  # (6, D): positives then negatives
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[0, 1] = exclude[0, 5] = exclude[2, 0] = True  # anchor 0: not p1 nor n2; anchor 2: not p0
    exclude_sym = torch.zeros(3, 3, dtype=torch.bool)
    exclude_sym[1, 2] = True  # positive 1 -> anchor 2 is a false negative

    def ref(x, y, ex):
        s = x @ y.T / t
        rows = [-s[i, i] + torch.logsumexp(torch.stack([s[i, j] for j in range(len(y)) if j == i or not ex[i, j]]), 0)
                for i in range(len(x))]
        return torch.stack(rows).mean().item()

    fwd = ref(a, cands, exclude)
    assert info_nce(a, p, n, temperature=t, exclude=exclude).item() == pytest.approx(fwd, rel=1e-12)
    bwd = ref(p, a, exclude_sym)
    got = info_nce(a, p, n, temperature=t, exclude=exclude, symmetric=True, exclude_sym=exclude_sym)
    assert got.item() == pytest.approx(0.5 * (fwd + bwd), rel=1e-12)
    # Without negatives, a square mask is read row = anchor, column = candidate (not transposed).
    sq = exclude[:, :3]
    assert info_nce(a, p, temperature=t, exclude=sq).item() == pytest.approx(ref(a, p, sq), rel=1e-12)


def test_group_info_nce_averages_per_anchor_then_over_anchors():
    from embedft.training.losses import group_info_nce

    # Uneven groups (3 texts and 2): the anchors of the big group have 2 pairs each, the others 1;
    # each anchor counts once, whatever its number of pairs.
    g = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    keys = torch.tensor([0, 0, 0, 1, 1])
    t = 0.2
    s = e @ e.T / t
    per_anchor = []
    for i in range(5):
        negs = [s[i, j] for j in range(5) if keys[j] != keys[i]]
        pairs = [-s[i, j] + torch.logsumexp(torch.stack([s[i, j], *negs]), 0)
                 for j in range(5) if j != i and keys[j] == keys[i]]
        per_anchor.append(torch.stack(pairs).mean())
    got = group_info_nce(e, e, keys, torch.eye(5, dtype=torch.bool), temperature=t)
    assert got.item() == pytest.approx(torch.stack(per_anchor).mean().item(), rel=1e-12)


def test_label_contrastive_is_l_out_with_several_positives():
    from embedft.training.losses import label_contrastive

    # Khosla et al.'s L_out: the mean over positives of log-probabilities (not the log of the mean
    # probability, L_in); the two differ once an item has two positives.
    g = torch.Generator().manual_seed(2)
    e = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    t = 0.5
    s = e @ e.T / t
    rows = []
    for i in range(6):
        others = [j for j in range(6) if j != i]
        log_den = torch.logsumexp(torch.stack([s[i, j] for j in others]), 0)
        pos = [j for j in others if labels[j] == labels[i]]
        if pos:
            rows.append(-torch.stack([s[i, j] - log_den for j in pos]).mean())
    got = label_contrastive(e, labels, temperature=t)
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-12)


def test_false_negative_mask_tests_every_key_of_a_text():
    # Anchor 0 has key 0; anchor 1 is a text of keys 1 and 2. Candidates: key 2; no key; keys 0 and 1.
    a = torch.tensor([[0, -1], [1, 2]])
    c = torch.tensor([[2, -1], [-1, -1], [0, 1]])
    got = false_negative_mask(a, c, torch.tensor([10, 11]), torch.tensor([20, 10, 21]))
    assert got.tolist() == [[False, True, True], [True, False, True]]  # [0, 1]: the same text (id 10), no key
    assert false_negative_mask(a[:, 0], c[:, 0], torch.tensor([10, 11]), torch.tensor([20, 10, 21])).tolist() == \
        [[False, True, True], [False, False, False]]  # one key per text: the (T,) form as before


def test_false_negative_mask_agrees_with_a_brute_force_over_random_key_sets():
    g = torch.Generator().manual_seed(0)
    for wa, wc in ((1, 1), (3, 1), (2, 5)):
        a = torch.randint(-1, 6, (9, wa), generator=g)
        c = torch.randint(-1, 6, (13, wc), generator=g)
        ai, ci = torch.randint(0, 20, (9,), generator=g), torch.randint(0, 20, (13,), generator=g)
        want = [[bool(ai[i] == ci[j]) or bool(set(a[i].tolist()) & set(c[j].tolist()) - {-1}) for j in range(13)]
                for i in range(9)]
        assert false_negative_mask(a, c, ai, ci).tolist() == want
