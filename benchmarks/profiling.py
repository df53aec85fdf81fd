"""Where a run's time goes: torch.profiler over a stretch of work, device time summed by kind.

    from profiling import Profiler, markdown
    with Profiler(device) as p:
        work()
    print(markdown([("label", p.result)]))

Used by `gpu_check.py --profile-batch` (training steps) and `bench_encode.py --profile`
(encoding). Two figures answer what the next lever is:

- device busy = the summed time of the device's kernels / the wall time. Well under 100%, the
  run is bound by the host (Python, kernel launches, copies waited for): fewer, larger calls
  (CUDA graphs, compiled layers) are the lever, not faster kernels.
- the kinds of kernel (matrix products, attention, compiled/fused, copies and casts,
  reductions and norms, element-wise) as shares of the busy time. MFU is bounded by the share of
  matrix products: element-wise work and casts are what fusing removes.

On a machine without CUDA the same code sums the self CPU time of the aten ops instead (no
busy figure), so it runs in the tests and in `gpu_session.py run --smoke`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

# First match wins, on the full kernel (or aten op) name. Hopper's cuBLAS kernels are "nvjet_*" or
# "sm90_xmma_gemm_*"; inductor's kernels are "triton_*" (its matmul templates "triton_tem_fused_mm*").
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product", re.I)),  # before matmul: fmha_cutlass*
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|wgmma|cublas|(^|[^a-z])(mm|addmm|bmm|baddbmm|matmul|linear)"
                          r"([^a-z]|$)", re.I)),
    ("compiled", re.compile(r"^triton|triton_", re.I)),
    ("copy/cast", re.compile(r"memcpy|memset|copy|(?<!no)cast", re.I)),  # not gpu_kernel_impl_nocast
    ("reduction/norm", re.compile(r"reduce|reduction|softmax|norm|^aten::(sum|mean|amax|var|var_mean)$", re.I)),
)
OTHER = "element-wise/other"
KIND_NAMES = tuple(k for k, _ in KINDS) + (OTHER,)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return OTHER


GENERIC = {"BinaryFunctor", "AUnaryFunctor", "BUnaryFunctor"}  # wrappers around the functor that says what


def short_name(name: str, width: int = 80) -> str:
    """A kernel's name without its template arguments, keeping the functor PyTorch's generic
    element-wise kernels are instantiated with (the part that says what they compute)."""
    name = re.sub(r"^void\s+", "", name.strip()).replace("(anonymous namespace)::", "")
    base = name.split("<", 1)[0].split("(", 1)[0].strip()
    inner = [f for f in re.findall(r"\b(\w*Functor\w*|\w+_kernel_cuda\w*|\w+Ops)\b", name)
             if f not in base and f not in GENERIC]
    short = base + (f"[{inner[0]}]" if inner else "")
    return short if len(short) <= width else short[: width - 3] + "..."


@dataclass
class Profile:
    device: str  # "cuda" or "cpu"
    reps: int  # units of work profiled (steps, encode calls); the figures below are per unit
    wall_s: float
    busy_s: float | None  # summed kernel time (None on the CPU, where no device timeline exists)
    kinds: dict[str, float] = field(default_factory=dict)  # seconds by kind
    top: list[tuple[str, str, float, float]] = field(default_factory=list)  # (name, kind, seconds, calls)

    @property
    def busy_share(self) -> float | None:
        return None if self.busy_s is None else self.busy_s / self.wall_s if self.wall_s else 0.0

    def share(self, kind: str) -> float:
        total = sum(self.kinds.values())
        return self.kinds.get(kind, 0.0) / total if total else 0.0

    def as_dict(self) -> dict:
        return {"device": self.device, "reps": self.reps, "wall_s": self.wall_s, "busy_s": self.busy_s,
                "busy_share": self.busy_share, "kind_shares": {k: self.share(k) for k in KIND_NAMES},
                "top": [{"name": n, "kind": k, "seconds": s, "calls": c} for n, k, s, c in self.top]}


def summarise(events, device: str, wall_s: float, reps: int, top: int = 8) -> Profile:
    """A Profile from torch.profiler's key_averages(): on CUDA its kernel events (device time),
    elsewhere its aten ops (self CPU time; the wrappers around them would count it twice)."""
    rows: dict[tuple[str, str], list[float]] = {}  # (short name, kind) -> [seconds, calls]: template variants summed
    for e in events:
        if device == "cuda":
            if getattr(e.device_type, "name", str(e.device_type)) == "CPU":
                continue
            seconds = e.self_device_time_total / 1e6
        else:
            if not e.key.startswith("aten::"):
                continue
            seconds = e.self_cpu_time_total / 1e6
        if seconds > 0:
            row = rows.setdefault((short_name(e.key), kind_of(e.key)), [0.0, 0.0])
            row[0] += seconds / reps
            row[1] += e.count / reps
    kinds = {k: 0.0 for k in KIND_NAMES}
    for (_, kind), (seconds, _) in rows.items():
        kinds[kind] += seconds
    busy = sum(kinds.values()) if device == "cuda" else None
    ranked = sorted(rows.items(), key=lambda r: -r[1][0])[:top]
    return Profile(device, reps, wall_s / reps, busy, kinds, [(n, k, s, c) for (n, k), (s, c) in ranked])


class Profiler:
    """torch.profiler around a stretch of work (a context manager, or start()/stop() from a
    callback such as a training loop's metric sink); `result` holds the Profile after stop()."""

    def __init__(self, device, reps: int = 1, top: int = 8):
        import torch

        self.device = "cuda" if str(device).startswith("cuda") else "cpu"
        self.reps, self.top, self.result = reps, top, None
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._prof.start()
        self._t0 = time.perf_counter()

    def stop(self) -> Profile:
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.stop()
        self.result = summarise(self._prof.key_averages(), self.device, wall, self.reps, self.top)
        return self.result

    def __enter__(self) -> "Profiler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def profile_runs(runs: dict, device) -> dict[str, Profile]:
    """Each callable of `runs` once under the profiler, one after the other (warm them first)."""
    out = {}
    for label, fn in runs.items():
        with Profiler(device) as p:
            fn()
        out[label] = p.result
    return out


def markdown(runs: list[tuple[str, Profile]]) -> str:
    """One table of the runs' wall time, device busy share and kinds, then each run's top kernels."""
    if not runs:
        return ""
    unit = "device kernel time" if runs[0][1].device == "cuda" else "aten self CPU time"
    head = ("| run | wall per unit (ms) | device busy | " + " | ".join(KIND_NAMES) + " |\n"
            "|---|---|---|" + "---|" * len(KIND_NAMES) + "\n")
    lines = []
    for label, p in runs:
        busy = "n/a" if p.busy_share is None else f"{100 * p.busy_share:.0f}%"
        lines.append(f"| {label} | {1e3 * p.wall_s:.1f} | {busy} | "
                     + " | ".join(f"{100 * p.share(k):.0f}%" for k in KIND_NAMES) + " |")
    out = [f"Shares of {unit}, per unit of work profiled:", "", head + "\n".join(lines)]
    for label, p in runs:
        out += ["", f"Top {len(p.top)} of {label} (ms per unit, calls per unit):", "",
                "| kernel | kind | ms | calls |\n|---|---|---|---|"]
        out += [f"| `{n.replace('|', '/')}` | {k} | {1e3 * s:.2f} | {c:g} |" for n, k, s, c in p.top]
    return "\n".join(out)
