"""The CPU's routed experts (``kernels.cpu.fused_moe_cpu``) on one thread, as an expert shard runs them.

    python benchmarks/bench_cpu_experts.py [--hidden 512 --inter 256 --experts 8] [--out results/bench_cpu_experts.json]

Defaults: the experts an expert shard holds of ``bench_serve.py``'s checkpoint (8 of 16, hidden 512, 256 wide,
1.5 MB each in float32). Three copies of the weights are cycled through (out of the caches, as in a step whose
other layers ran in between). Prints and saves:

- by rows per expert (1 to 32, every expert the same): microseconds per expert and the weights' bytes per second,
  for the kernel on the weights as the engines lay them out (``kernels.lay_out_experts``, where this checkout has
  it) and for the torch reference (``fused_moe_ref``) on the same;
- a decode step's layer: 16 tokens, top-4 of 16 experts of which this shard holds 8, milliseconds per layer.

Every result is checked against the reference (max abs difference). Run it with ``PYTHONPATH`` at another
checkout to measure that checkout's kernel side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def lay_out(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The weights as this checkout's engines hold them for the CPU kernel."""
    try:
        from latentmoe.kernels import lay_out_experts
    except ImportError:  # a checkout from before the layout: its kernel reads the weights by rows
        return w13, w2, "rows"
    holder = torch.nn.Module()
    holder.w13, holder.w2 = torch.nn.Parameter(w13.clone()), torch.nn.Parameter(w2.clone())
    lay_out_experts(holder, by_columns=True)
    return holder.w13.data, holder.w2.data, "columns"


def timed(fn, iters: int) -> float:
    """Median seconds per call over ``iters`` calls (``fn(i)``), after three warm-up calls."""
    for i in range(3):
        fn(i)
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8, help="experts this shard holds")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="results/bench_cpu_experts.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shard's

    from latentmoe.kernels.cpu import fused_moe_cpu
    from latentmoe.kernels.reference import fused_moe_ref

    D, inter, E = args.hidden, args.inter, args.experts
    gen = torch.Generator().manual_seed(0)
    copies = []
    for _ in range(3):
        w13 = torch.randn(E, 2 * inter, D, generator=gen) * D ** -0.5
        w2 = torch.randn(E, D, inter, generator=gen) * inter ** -0.5
        copies.append((w13, w2, *lay_out(w13, w2)))
    layout = copies[0][4]
    expert_bytes = 3 * D * inter * 4
    print(f"{E} experts of {D} x {inter} ({expert_bytes / 2 ** 20:.2f} MiB each), one thread, kernel on weights by "
          f"{layout}")
    result = {"hidden": D, "inter": inter, "experts": E, "layout": layout, "threads": 1, "iters": args.iters,
              "stat": "median", "machine": platform.machine(), "cpus": os.cpu_count(), "by_rows": [], "decode": {}}

    for n in (1, 2, 4, 6, 8, 12, 16, 24, 32):
        x = torch.randn(E * n, D, generator=gen)
        ids = (torch.arange(E * n) % E)[:, None]  # n rows on every expert
        w = torch.rand(E * n, 1, generator=gen) + 0.1
        row = {"rows": n}
        for name, fn in (("kernel", lambda i: fused_moe_cpu(x, *copies[i % 3][2:4], ids, w)),
                         ("reference", lambda i: fused_moe_ref(x, *copies[i % 3][:2], ids, w))):
            s = timed(fn, args.iters)
            row[f"{name}_us_per_expert"] = s / E * 1e6
            row[f"{name}_gb_s"] = E * expert_bytes / s / 1e9
        row["max_abs_diff"] = (fused_moe_cpu(x, *copies[0][2:4], ids, w)
                               - fused_moe_ref(x, *copies[0][:2], ids, w)).abs().max().item()
        result["by_rows"].append(row)
        print(f"rows {n:3d}: kernel {row['kernel_us_per_expert']:7.1f} us/expert ({row['kernel_gb_s']:5.1f} GB/s), "
              f"reference {row['reference_us_per_expert']:7.1f} ({row['reference_gb_s']:5.1f} GB/s), "
              f"max diff {row['max_abs_diff']:.1e}", flush=True)

    T, K, all_experts = 16, 4, 2 * E
    x = torch.randn(T, D, generator=gen)
    ids = torch.stack([torch.randperm(all_experts, generator=gen)[:K] for _ in range(T)])
    ids = torch.where(ids < E, ids, -1)  # the other half lies on the other shard
    w = torch.rand(T, K, generator=gen)
    decode = {"tokens": T, "top_k": K, "pairs_here": int((ids >= 0).sum())}
    for name, fn in (("kernel", lambda i: fused_moe_cpu(x, *copies[i % 3][2:4], ids, w)),
                     ("reference", lambda i: fused_moe_ref(x, *copies[i % 3][:2], ids, w))):
        decode[f"{name}_ms"] = timed(fn, args.iters) * 1e3
    result["decode"] = decode
    print(f"decode layer ({T} tokens, top-{K} of {all_experts}, {decode['pairs_here']} pairs here): kernel "
          f"{decode['kernel_ms']:.3f} ms, reference {decode['reference_ms']:.3f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
