"""CPU attention kernels: PyTorch's flash vs math SDPA, forward and forward+backward, fp32 and bf16.

    python benchmarks/bench_cpu_attention.py [--batch 64] [--lengths 16,32,64,128] [--repeats 8]

Why `embedft.modeling.runtime.sdpa_backends` picks the math kernel for bf16 training on the CPU and
leaves the default (flash) everywhere else. Shapes: MiniLM's heads (12 x 32) and Qwen3-0.6B's
(16 x 128), a padding mask as embedft's batches have (a quarter of the rows half padded), the
median of --repeats calls after two warm-up calls. Prints a table and the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

HEADS = {"MiniLM (12 x 32)": (12, 32), "Qwen3-0.6B (16 x 128)": (16, 128)}


def time_call(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(batch: int, heads: int, dim: int, length: int, dtype, backward: bool, backend, repeats: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    mask[: batch // 4, :, :, length // 2:] = False  # padded keys of a quarter of the rows

    def call():
        with sdpa_kernel([backend]), torch.inference_mode(not backward):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if backward:
                out.sum().backward()

    return time_call(call, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lengths", default="16,32,64,128")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    import torch
    from torch.nn.attention import SDPBackend

    rows = []
    print("| heads x dim | length | dtype | pass | flash (ms) | math (ms) | math / flash time |\n"
          "|---|---|---|---|---|---|---|")
    for label, (heads, dim) in HEADS.items():
        for length in (int(x) for x in args.lengths.split(",")):
            for dtype in (torch.float32, torch.bfloat16):
                for backward in (False, True):
                    flash, math_ = (measure(args.batch, heads, dim, length, dtype, backward, b, args.repeats)
                                    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH))
                    row = {"heads": label, "length": length, "dtype": str(dtype).split(".")[-1],
                           "pass": "fwd+bwd" if backward else "fwd", "flash_ms": 1e3 * flash, "math_ms": 1e3 * math_}
                    rows.append(row)
                    print(f"| {label} | {length} | {row['dtype']} | {row['pass']} | {row['flash_ms']:.1f} | "
                          f"{row['math_ms']:.1f} | {math_ / flash:.2f} |", flush=True)
    print(json.dumps({"batch": args.batch, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}", "rows": rows}))


if __name__ == "__main__":
    main()
