"""Forward-call chunking: optimal cuts (checked by brute force), the row and token bounds, CPU vs CUDA."""

import numpy as np
import pytest

from embedft.modeling.chunking import CALL_OVERHEAD_TOKENS, call_overhead, forward_chunks, length_chunks


def _padded_cost(lengths, chunks, overhead):
    return sum(len(c) * max(lengths[i] for i in c) + overhead for c in chunks)


def _best_cost_brute_force(sorted_lengths, max_rows, overhead, max_tokens=None):
    """Cheapest split of a sorted list into consecutive chunks, by trying every cut set."""
    n = len(sorted_lengths)
    best = None
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        parts = [sorted_lengths[a:b] for a, b in zip(cuts, cuts[1:])]
        if any(len(p) > max_rows or (max_tokens and len(p) > 1 and len(p) * max(p) > max_tokens) for p in parts):
            continue
        cost = sum(len(p) * max(p) + overhead for p in parts)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_length_chunks_is_an_optimal_partition(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=11).tolist()
    chunks = length_chunks(lengths, max_rows=4, overhead=20)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(11))  # every text exactly once
    assert all(len(c) <= 4 for c in chunks)
    assert _padded_cost(lengths, chunks, 20) == _best_cost_brute_force(sorted(lengths), 4, 20)


@pytest.mark.parametrize("seed", range(5))
def test_length_chunks_keeps_the_token_bound_and_is_optimal_within_it(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=11).tolist()
    chunks = length_chunks(lengths, max_rows=11, overhead=1000, max_tokens=120)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(11))
    assert all(len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 120 for c in chunks)
    assert _padded_cost(lengths, chunks, 1000) == _best_cost_brute_force(sorted(lengths), 11, 1000, max_tokens=120)
    assert [c.tolist() for c in length_chunks([200, 5], 4, max_tokens=100)] == [[1], [0]]  # too long alone: own chunk


def test_forward_chunks_on_cuda_bound_tokens_not_rows():
    # 200 short texts and one 40 tokens long, batch 8: at most 8 x 40 = 320 padded tokens a call.
    lengths = [4] * 200 + [40]
    cpu, cuda = forward_chunks(lengths, 8, "cpu"), forward_chunks(lengths, 8, "cuda")
    assert [c.tolist() for c in cpu] == [c.tolist() for c in length_chunks(lengths, 8)[::-1]]  # as before
    assert max(map(len, cpu)) == 8 and len(cpu) == 26
    assert cuda[0].tolist() == [200]  # longest first: an out-of-memory batch fails at once
    assert all(len(c) * max(lengths[i] for i in c) <= 8 * 40 for c in cuda)
    assert len(cuda) == 4 and sorted(np.concatenate(cuda).tolist()) == list(range(201))  # 80 + 80 + 40 short rows
    assert forward_chunks([], 8, "cuda") == []


def test_length_chunks_edge_cases():
    assert length_chunks([], 8) == []
    assert [c.tolist() for c in length_chunks([5, 5, 5], 8, overhead=10)] == [[0, 1, 2]]  # no padding: one call
    assert [len(c) for c in length_chunks([3] * 10, 4)] == [2, 4, 4]  # rows capped


def test_gpu_chunking_takes_fewest_calls():
    # On CUDA a call's fixed cost outweighs padding: cut only where max_rows forces it.
    lengths = [3, 60, 4, 58, 5, 61, 2, 59]
    assert call_overhead("cpu") == CALL_OVERHEAD_TOKENS
    assert [len(c) for c in length_chunks(lengths, 8, call_overhead("cpu"))] == [4, 4]  # splits short/long
    assert [len(c) for c in length_chunks(lengths, 8, call_overhead("cuda"))] == [8]
    assert [len(c) for c in length_chunks(lengths, 3, call_overhead("cuda"))] == [3, 2, 3]  # 3 calls, least padding


def test_distinct_keeps_first_seen_order_and_maps_back():
    from embedft.modeling.chunking import distinct

    items = ["b", "a", "b", "c", "a", "b"]
    unique, inverse = distinct(items)
    assert unique == ["b", "a", "c"] and inverse.tolist() == [0, 1, 0, 2, 1, 0]
    assert [unique[i] for i in inverse] == items
    unique, inverse = distinct([])
    assert unique == [] and inverse.shape == (0,)
