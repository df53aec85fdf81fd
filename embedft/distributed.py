"""Several processes under torchrun, on PyTorch's own engine (torch.distributed).

`torchrun --nproc-per-node N -m embedft ...` starts N copies of a command; each reads its place
from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). `setup()`
joins them into one process group: NCCL on GPUs, gloo on CPUs. Without torchrun there is one
process, `world_size` is 1, and every helper here is a no-op that returns its input.

What the stages use:
- `Dist` (`current()`): rank, world size, `is_main` (rank 0, the only rank that writes files,
  checkpoints and the MLflow run);
- `place(device)`: the process group joined and this rank's own GPU;
- `balanced_shard(lengths)`: the sequences this rank embeds, dealt by length;
- `gather_rows(local, counts)`: the rows of every rank, concatenated in rank order, on every rank.
  With a graph, the backward hands each rank the gradient of its own rows only: every rank then
  computes the same loss over the same global rows, and `all_reduce_grads` sums the parameters'
  gradients, which is exactly the one-process gradient;
- `all_gather_array` / `broadcast_object` / `barrier` for numpy results and decisions.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# How long a rank waits for the others at a collective before giving up (validation and mining run
# on every rank between steps, so this bounds the slowest of those, not a step).
TIMEOUT_MINUTES = 30


@dataclass(frozen=True)
class Dist:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT = Dist()


def from_env(env: dict[str, str] | None = None) -> Dist:
    """The place torchrun gave this process (RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise RuntimeError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers ({e}); start the command "
                           "with torchrun, or unset them for one process") from None
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is not within WORLD_SIZE={world}; start the command with torchrun, "
                           "or unset them for one process")
    return Dist(rank, world, local)


def current() -> Dist:
    """The place `setup()` found (one process before it, or without torchrun)."""
    return _CURRENT


def setup(device_kind: str | None = None) -> Dist:
    """Join the run's process group when started by torchrun (WORLD_SIZE > 1): NCCL when
    `device_kind` is "cuda", gloo otherwise. Idempotent; one process is left alone."""
    global _CURRENT
    import torch.distributed as td

    d = from_env()
    if not d.enabled:
        _CURRENT = d
        return d
    if not td.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        td.init_process_group(backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
        atexit.register(teardown)
        if not d.is_main:  # one voice: the other ranks say only what goes wrong
            logging.getLogger("embedft").setLevel(logging.WARNING)
        log.info("%d processes joined the process group (%s); this is rank %d", d.world_size, backend, d.rank)
    _CURRENT = d
    return d


def place(device):
    """(this rank's device, its place): `setup()` for `device`'s kind, and under torchrun on CUDA the
    rank's own GPU (LOCAL_RANK; on one GPU the ranks share it), made the current device, which NCCL's
    object collectives use. One process keeps `device` as it is."""
    import torch

    d = setup(device.type)
    if d.enabled and device.type == "cuda":
        if torch.cuda.device_count() > 1:
            device = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device, d


def teardown(sync: bool = False) -> None:
    """Leave the process group (at the end of a command). With `sync` (a command that ended well on every
    rank), after a barrier: every rank's last collective is then complete before any rank closes its
    connections. Without one, a rank that left at once could close them under a gloo peer still finishing
    its last send, which aborts that peer ("terminate called without an active exception"). A failed
    command leaves without it: the other ranks may be in another collective, and torchrun stops them."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        if sync:
            td.barrier()
        td.destroy_process_group()


@dataclass(frozen=True)
class Share:
    """One rank's share of n sequences, dealt by length so every rank gets about as many tokens.

    `mine`: the positions this rank embeds; `counts[r]`: how many rank r embeds; `order`: the
    positions of every rank's rows in rank order (what `gather_rows` of the shares returns).
    """

    mine: np.ndarray
    counts: tuple[int, ...]
    order: np.ndarray

    def restore(self, gathered):
        """Rows gathered in rank order (`gather_rows`, `all_gather_array`) back in input order."""
        inv = np.empty_like(self.order)
        inv[self.order] = np.arange(len(self.order))
        if isinstance(gathered, np.ndarray):
            return gathered[inv]
        import torch

        return gathered[torch.as_tensor(inv, device=gathered.device)]

    def assemble(self, local: np.ndarray) -> np.ndarray:
        """(n, ...) every rank's rows of `mine` (local: this rank's, in `mine` order), in input order."""
        if len(self.counts) == 1:
            return local
        return self.restore(_gather_host(local, self.counts))


def balanced_shard(lengths: Sequence[int], dist: Dist | None = None) -> Share:
    """Deal n sequences to the ranks by length (sorted, then round-robin): every rank's share has
    about the same tokens, so no rank waits long for the others at the gather."""
    d = dist or current()
    order_by_len = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    parts = [order_by_len[r::d.world_size] for r in range(d.world_size)]
    return Share(parts[d.rank], tuple(len(p) for p in parts), np.concatenate(parts) if parts else order_by_len)


def barrier() -> None:
    if current().enabled:
        import torch.distributed as td

        td.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank (picklable objects: metrics, decisions, mined arrays)."""
    if not current().enabled:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_array(local: np.ndarray) -> np.ndarray:
    """Every rank's rows (along axis 0) concatenated in rank order, on every rank."""
    if not current().enabled:
        return local
    counts = [int(c) for c in all_gather_object(len(local))]
    return _gather_host(local, counts)


def _gather_host(local: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """`gather_rows` of host arrays: through the GPU under NCCL (which moves CUDA tensors only)."""
    import torch
    import torch.distributed as td

    t = torch.from_numpy(np.ascontiguousarray(local))
    if td.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    return gather_rows(t, counts).cpu().numpy()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order."""
    if not current().enabled:
        return [obj]
    import torch.distributed as td

    out: list[Any] = [None] * current().world_size
    td.all_gather_object(out, obj)
    return out


def gather_rows(local, counts: Sequence[int]):
    """(sum(counts), ...) every rank's rows in rank order, on every rank; `counts[r]` is rank r's
    number of rows, known to every rank. With a graph, the backward hands each rank the gradient
    of its own rows (see the module's docstring); combine with `all_reduce_grads`."""
    if not current().enabled:
        return local
    return _gather_rows_fn().apply(local, tuple(int(c) for c in counts))


def all_reduce_grads(params: Iterable) -> None:
    """Sum the gradients of params over the ranks, in one flat buffer (LoRA's are small). Every rank
    passes the same params; one that got no gradient (a rank with no rows this step) adds zeros."""
    if not current().enabled:
        return
    import torch
    import torch.distributed as td

    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    td.all_reduce(flat, op=td.ReduceOp.SUM)
    at = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[at:at + n].view_as(p.grad))
        at += n


def broadcast_params(params: Iterable, src: int = 0) -> None:
    """Every rank takes rank `src`'s values of params (the LoRA weights at the start of training)."""
    if not current().enabled:
        return
    import torch
    import torch.distributed as td

    with torch.no_grad():
        for p in params:
            td.broadcast(p.data, src=src)


@functools.cache
def _gather_rows_fn():
    """The autograd function behind `gather_rows`, made on first use (torch is imported lazily)."""
    import torch
    import torch.distributed as td

    class GatherRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, local, counts):
            ctx.rank, ctx.counts = current().rank, counts
            width = max(counts)
            padded = local.new_zeros((width, *local.shape[1:]))
            padded[: local.shape[0]] = local
            parts = [torch.empty_like(padded) for _ in counts]
            td.all_gather(parts, padded.contiguous())
            return torch.cat([p[:c] for p, c in zip(parts, counts)])

        @staticmethod
        def backward(ctx, grad):
            start = sum(ctx.counts[: ctx.rank])
            return grad[start:start + ctx.counts[ctx.rank]], None

    return GatherRows
