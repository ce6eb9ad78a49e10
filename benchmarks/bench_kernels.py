"""Kernel speed at DeepSeek-V2-Lite shapes, against what the GPU can do.

    python benchmarks/bench_kernels.py [--quick] [--sweep] [--out results/bench_kernels.json]

Needs a CUDA device (exits with status 2 otherwise). First measures the device: copy
bandwidth (a 1 GiB device-to-device copy, bytes read + written) and the bf16 matrix-product
rate (8192³). Then, with CUDA events after a warm-up and the L2 cache flushed before each
timed call:

- MLA decode (16 heads, kv_lora_rank 512, rope 64, bf16, block size 64, shuffled blocks),
  batch 1 to 128 × context 1K to 32K: achieved bandwidth = cache + query + output bytes over
  time, as a fraction of the copy bandwidth. Target: 80 % at batch >= 64, context >= 4K.
- Fused MoE (64 experts × 2048 hidden × 1408 wide, top-6, bf16), 1 to 4096 tokens: bytes
  (the weights of the experts hit, plus activations), TFLOP/s, and the time of the per-expert
  torch loop (``fused_moe_ref``) on the same inputs. Target: at least 2× the loop everywhere.

``--sweep`` also times other split counts / tile configurations and reports the fastest, for
tuning the launchers' defaults. Every case is checked against its reference (max abs error).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

H, R, P, PAGE = 16, 512, 64, 64  # heads, kv_lora_rank, rope dims, cache block size
E, D, INTER, TOP_K = 64, 2048, 1408, 6  # experts, hidden, expert width, experts per token


class Timer:
    """Median of CUDA-event times of ``fn()``, after warm-up, with L2 flushed before each call."""

    def __init__(self, warmup: int, iters: int, flush_bytes: int = 256 << 20):
        self.warmup, self.iters = warmup, iters
        self.flush_buf = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:  # milliseconds
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for start, end in zip(starts, ends):
            self.flush_buf.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def measure_device(timer: Timer) -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_ms = timer(lambda: a @ b)
    return {"name": torch.cuda.get_device_name(), "num_sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "copy_gb_s": 2 * (1 << 30) / copy_ms / 1e6, "matmul_bf16_tflop_s": 2 * n**3 / mm_ms / 1e9}


def bench_mla(timer: Timer, batches, contexts, copy_gb_s: float, sweep: bool) -> list[dict]:
    from latentmoe.kernels.mla_decode import mla_decode, mla_decode_ref, num_decode_splits

    rows = []
    scale = (R + P) ** -0.5  # the kernel's speed does not depend on it
    for B in batches:
        for ctx in contexts:
            blocks_per_seq = ctx // PAGE
            num_blocks = B * blocks_per_seq
            kv_cache = torch.randn(num_blocks, PAGE, R + P, dtype=torch.bfloat16, device="cuda")
            block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(B, blocks_per_seq)
            seq_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
            q_nope = torch.randn(B, H, R, dtype=torch.bfloat16, device="cuda")
            q_pe = torch.randn(B, H, P, dtype=torch.bfloat16, device="cuda")
            args = (q_nope, q_pe, kv_cache, block_tables, seq_lens, scale)
            moved = (kv_cache.numel() + 2 * q_nope.numel() + q_pe.numel()) * 2 + block_tables.numel() * 4  # out = q_nope
            flops = 2 * B * H * ctx * (R + P) + 2 * B * H * ctx * R
            num_splits = num_decode_splits(B, 1, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
            ms = timer(lambda: mla_decode(*args))
            row = {"batch": B, "context": ctx, "num_splits": num_splits, "ms": ms,
                   "gb_s": moved / ms / 1e6, "tflop_s": flops / ms / 1e9}
            row["frac_of_copy"] = row["gb_s"] / copy_gb_s
            if B * ctx <= 128 * 1024:
                ref = mla_decode_ref(*args)
                row["max_abs_err"] = (mla_decode(*args).float() - ref.float()).abs().max().item()
            if sweep:
                best = (ms, {"num_splits": num_splits})
                for splits in (1, 2, 4, 8, 16, 32, 64):
                    for block_n, warps, stages in ((16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 4, 2), (64, 8, 3)):
                        kw = dict(num_splits=splits, block_size_n=block_n, num_warps=warps, num_stages=stages)
                        try:
                            t = timer(lambda: mla_decode(*args, **kw))
                        except Exception as e:  # out of shared memory or registers: not a candidate
                            print(f"  skip {kw}: {type(e).__name__}", file=sys.stderr)
                            continue
                        if t < best[0]:
                            best = (t, kw)
                row["best_ms"], row["best_config"] = best
                row["best_frac_of_copy"] = moved / best[0] / 1e6 / copy_gb_s
            rows.append(row)
            print(f"mla  B={B:4d} ctx={ctx:6d} splits={num_splits:3d} {ms:8.3f} ms {row['gb_s']:8.1f} GB/s "
                  f"({100 * row['frac_of_copy']:5.1f} % of copy) {row['tflop_s']:6.1f} TFLOP/s"
                  + (f"  best {best[0]:.3f} ms {best[1]}" if sweep else ""), flush=True)
            del kv_cache, args
    return rows


def bench_moe(timer: Timer, token_counts, copy_gb_s: float, sweep: bool) -> list[dict]:
    from latentmoe.kernels.fused_moe import fused_moe, fused_moe_ref, moe_config

    w13 = torch.randn(E, 2 * INTER, D, dtype=torch.bfloat16, device="cuda") * D**-0.5
    w2 = torch.randn(E, D, INTER, dtype=torch.bfloat16, device="cuda") * INTER**-0.5
    rows = []
    for T in token_counts:
        x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
        topk_weights, topk_ids = torch.rand(T, E, device="cuda").softmax(-1).topk(TOP_K, dim=-1)
        args = (x, w13, w2, topk_ids, topk_weights)
        experts_hit = int(topk_ids.unique().numel())
        moved = experts_hit * 3 * INTER * D * 2 + 2 * T * D * 2
        flops = 2 * T * TOP_K * 3 * INTER * D
        ms = timer(lambda: fused_moe(*args))
        loop_ms = timer(lambda: fused_moe_ref(*args))
        err = (fused_moe(*args).float() - fused_moe_ref(*args).float()).abs().max().item()
        row = {"tokens": T, "experts_hit": experts_hit, "ms": ms, "loop_ms": loop_ms, "speedup": loop_ms / ms,
               "gb_s": moved / ms / 1e6, "tflop_s": flops / ms / 1e9, "config": moe_config(T * TOP_K, E),
               "max_abs_err": err}
        row["frac_of_copy"] = row["gb_s"] / copy_gb_s
        if sweep:
            best = (ms, row["config"])
            for bm, bn, bk, warps, stages in ((16, 64, 128, 4, 3), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3),
                                              (32, 64, 64, 4, 3), (32, 128, 64, 4, 4), (64, 64, 64, 4, 3),
                                              (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)):
                cfg = dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_warps=warps, num_stages=stages)
                try:
                    t = timer(lambda: fused_moe(*args, config=cfg))
                except Exception as e:
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if t < best[0]:
                    best = (t, cfg)
            row["best_ms"], row["best_config"] = best
        rows.append(row)
        print(f"moe  T={T:5d} experts={experts_hit:2d} {ms:8.3f} ms (loop {loop_ms:8.3f} ms, {row['speedup']:5.2f}x) "
              f"{row['gb_s']:8.1f} GB/s ({100 * row['frac_of_copy']:5.1f} % of copy) {row['tflop_s']:6.1f} TFLOP/s"
              + (f"  best {best[0]:.3f} ms {best[1]}" if sweep else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes only, fewer iterations")
    ap.add_argument("--sweep", action="store_true", help="also time other splits / tiles and report the best")
    ap.add_argument("--skip-mla", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--out", default="results/bench_kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here (torch.cuda.is_available() is False); the kernels' speed can only "
              "be measured on a GPU. Nothing was measured.", file=sys.stderr)
        sys.exit(2)

    import triton

    timer = Timer(warmup=3 if args.quick else 10, iters=10 if args.quick else 30)
    device = measure_device(timer)
    print(f"{device['name']}: copy {device['copy_gb_s']:.0f} GB/s, bf16 matmul "
          f"{device['matmul_bf16_tflop_s']:.0f} TFLOP/s, {device['num_sms']} SMs", flush=True)
    batches = (1, 64) if args.quick else (1, 8, 32, 64, 128)
    contexts = (1024, 4096) if args.quick else (1024, 4096, 16384, 32768)
    token_counts = (1, 64, 1024) if args.quick else (1, 4, 16, 64, 256, 1024, 4096)
    result = {
        "device": device, "torch": torch.__version__, "triton": triton.__version__, "machine": platform.machine(),
        "shapes": {"mla": {"heads": H, "kv_lora_rank": R, "rope": P, "block_size": PAGE, "dtype": "bfloat16"},
                   "moe": {"experts": E, "hidden": D, "inter": INTER, "top_k": TOP_K, "dtype": "bfloat16"}},
        "timing": {"warmup": timer.warmup, "iters": timer.iters, "stat": "median", "l2_flushed": True},
    }
    if not args.skip_mla:
        result["mla_decode"] = bench_mla(timer, batches, contexts, device["copy_gb_s"], args.sweep)
        target = [r for r in result["mla_decode"] if r["batch"] >= 64 and r["context"] >= 4096]
        if target:
            worst = min(r["frac_of_copy"] for r in target)
            print(f"mla: worst fraction of copy bandwidth at batch >= 64, context >= 4K: {100 * worst:.1f} % "
                  f"(target 80 %)")
    if not args.skip_moe:
        result["fused_moe"] = bench_moe(timer, token_counts, device["copy_gb_s"], args.sweep)
        worst = min(r["speedup"] for r in result["fused_moe"])
        print(f"moe: worst speedup over the per-expert torch loop: {worst:.2f}x (target 2x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
