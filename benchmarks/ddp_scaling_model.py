"""A scaling model for embedft under torchrun: bytes gathered and reduced per step against the
compute per step, for Qwen3-Embedding-0.6B and -4B with LoRA on Q/K/V, on 8 GPUs in one node and
2 nodes x 8 GPUs, from published bandwidths. Arithmetic only; nothing is run.

    python benchmarks/ddp_scaling_model.py [--batch 1024] [--hard-negatives 1] [--tokens 64] [--r 16] [--mfu 0.4]

Per step embedft makes two collectives (`embedft/distributed.py`):
- an all-gather of the step's embeddings in fp32: (batch x (1 + hard negatives)) rows x the model's
  width; each rank receives (W-1)/W of it (ring);
- an all-reduce of the LoRA gradients in fp32; each rank sends and receives 2 (W-1)/W of it (ring).
Compute per step: LoRA on a frozen base needs the forward (2 N T FLOPs, N the non-embedding
parameters, T the step's tokens) and the backward to the activations (another ~2 N T; the frozen
weights get no gradient), so ~4 N T, at `--mfu` of an H100 SXM's dense bf16 peak (989 TFLOPS).
Bandwidths (NCCL bus bandwidth, what its ring achieves, below the links' nominal rates):
- NVLink 4 / NVSwitch, 8 x H100 SXM in one node: 900 GB/s per GPU both ways, ~400 GB/s bus bandwidth;
- 2 nodes, one 400 Gb/s InfiniBand NDR adapter per GPU (as DGX H100): 50 GB/s per GPU each way,
  ~45 GB/s bus bandwidth, which bounds the ring across nodes.
Each collective also pays a latency (~30 us within a node, ~60 us across nodes at these sizes).
"""

from __future__ import annotations

import argparse

# name: (hidden, layers, attention heads, kv heads, head dim, intermediate)  (the models' config.json)
MODELS = {"Qwen3-Embedding-0.6B": (1024, 28, 16, 8, 128, 3072),
          "Qwen3-Embedding-4B": (2560, 36, 32, 8, 128, 9728)}
PEAK_BF16 = 989e12  # H100 SXM dense bf16 FLOP/s
SETUPS = {"1 node x 8 GPUs": (8, 400e9, 30e-6), "2 nodes x 8 GPUs": (16, 45e9, 60e-6)}


def non_embedding_params(hidden: int, layers: int, heads: int, kv: int, hd: int, inter: int) -> int:
    attn = hidden * (heads * hd + 2 * kv * hd) + heads * hd * hidden
    mlp = 3 * hidden * inter
    return layers * (attn + mlp)


def lora_params(hidden: int, layers: int, heads: int, kv: int, hd: int, r: int) -> int:
    """LoRA A (r x in) and B (out x r) on q, k and v of every layer."""
    return layers * r * ((hidden + heads * hd) + 2 * (hidden + kv * hd))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1024, help="global batch (anchors)")
    ap.add_argument("--hard-negatives", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="mean tokens per sequence")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--mfu", type=float, default=0.4)
    a = ap.parse_args()
    rows = a.batch * (2 + a.hard_negatives)  # anchors, positives, hard negatives
    tokens = rows * a.tokens
    print(f"global batch {a.batch} anchors + positives + {a.hard_negatives} hard negative(s) each = {rows} sequences x "
          f"{a.tokens} tokens; LoRA r={a.r} on q,k,v; compute at {a.mfu:.0%} of {PEAK_BF16 / 1e12:.0f} TFLOPS\n")
    print("| model | GPUs | all-gather (MB) | all-reduce (MB) | compute / GPU / step | communication / step | share |")
    print("|---|---|---|---|---|---|---|")
    for name, (h, L, nh, kv, hd, inter) in MODELS.items():
        n = non_embedding_params(h, L, nh, kv, hd, inter)
        gather_bytes = rows * h * 4
        reduce_bytes = lora_params(h, L, nh, kv, hd, a.r) * 4
        for setup, (w, busbw, lat) in SETUPS.items():
            compute = 4 * n * tokens / (w * a.mfu * PEAK_BF16)
            comm = (w - 1) / w * gather_bytes / busbw + 2 * (w - 1) / w * reduce_bytes / busbw + 2 * lat
            print(f"| {name} ({n / 1e9:.2f}B non-embedding) | {setup} | {gather_bytes / 1e6:.1f} | "
                  f"{reduce_bytes / 1e6:.1f} | {compute * 1e3:.0f} ms | {comm * 1e3:.2f} ms | {comm / (compute + comm):.1%} |")


if __name__ == "__main__":
    main()
