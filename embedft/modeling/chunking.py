"""Forward calls: how texts of mixed lengths are cut into padded batches.

Each chunk is padded only to its own longest sequence; where the cuts go trades the padding
saved against each call's fixed cost, which differs by device (a CPU pays in arithmetic, a GPU
in kernel launches). Used by every encode (`modeling.encoder.Encoder.encode_ids`,
`search.indexing.encode`), which first embed each distinct text once (`distinct`), and by the
training steps (`training.step.embed`, cached negatives).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence, TypeVar

import numpy as np
import torch

H = TypeVar("H", bound=Hashable)

# A forward call costs about this many padded tokens of work on top of its tokens (measured on
# CPU with MiniLM, see docs/benchmarks.md); it keeps the chunking below from splitting too finely.
CALL_OVERHEAD_TOKENS = 48
# On a GPU a call's fixed cost (kernel launches of every layer, ~10-30 ms eager) outweighs any
# padding it could save: there, cut only where max_rows forces it (fewest calls, then least padding).
CUDA_CALL_OVERHEAD_TOKENS = 1 << 24


def call_overhead(device: torch.device | str) -> int:
    """The `length_chunks` overhead for forward calls on this device."""
    return CUDA_CALL_OVERHEAD_TOKENS if torch.device(device).type == "cuda" else CALL_OVERHEAD_TOKENS


def length_chunks(lengths: Sequence[int], max_rows: int, overhead: int = CALL_OVERHEAD_TOKENS,
                  max_tokens: int | None = None) -> list[np.ndarray]:
    """Split sequences into forward chunks that waste the least work on padding.

    Sequences are sorted by length and cut into consecutive chunks of at most max_rows rows
    and, with `max_tokens`, at most that many padded tokens (rows x longest; a sequence longer
    than that on its own still gets its own chunk), minimising sum(rows x longest + overhead)
    over chunks (exact, by dynamic programming). Returns index arrays into `lengths`, shortest
    chunk first.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    n = len(order)
    if n == 0:
        return []
    L = np.asarray(lengths, dtype=np.int64)[order]
    best = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        rows = max_rows if max_tokens is None else min(max_rows, max(1, max_tokens // max(int(L[j - 1]), 1)))
        i = np.arange(max(0, j - rows), j)
        cost = best[i] + (j - i) * L[j - 1] + overhead
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    bounds = []
    j = n
    while j > 0:
        bounds.append((int(cut[j]), j))
        j = int(cut[j])
    return [order[a:b] for a, b in reversed(bounds)]


def forward_chunks(lengths: Sequence[int], batch_size: int, device: torch.device | str) -> list[np.ndarray]:
    """The forward calls of an encode of `batch_size`: `length_chunks`, longest chunk first (an
    out-of-memory batch then fails at once, not at the end).

    No call holds more padded tokens than batch_size rows of the longest sequence, the largest
    batch a plain batch_size encode runs, so peak memory is no higher. On CUDA that is the only
    bound: short texts share a call in their hundreds, since there a call's fixed cost (every
    layer's kernel launches) is what a small model's encode waits for. Elsewhere a call also holds
    at most batch_size rows.
    """
    if not len(lengths):
        return []
    cuda = torch.device(device).type == "cuda"
    return length_chunks(lengths, len(lengths) if cuda else batch_size, call_overhead(device),
                         max_tokens=batch_size * max(lengths))[::-1]


def distinct(items: Iterable[H]) -> tuple[list[H], np.ndarray]:
    """The distinct items in first-seen order, and where each item is among them:
    `[unique[i] for i in inverse] == list(items)`. Encodes embed each distinct text once."""
    first: dict[H, int] = {}
    inverse = np.fromiter((first.setdefault(x, len(first)) for x in items), dtype=np.int64)
    return list(first), inverse
