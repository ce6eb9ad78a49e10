"""The project's CUDA path in one run, for the few sessions that are lent a GPU (``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_check.py [--out DIR] [--only tests,kernels,engine,nccl] [--small]

Four parts, each in a subprocess of its own with a time limit, so one that breaks or hangs costs only itself:

1. **tests**: the suite's CUDA tests (``tests/kernels``: Triton kernels compiled for the GPU against the torch
   references, fp32 and bf16, and the engine with them forced on; ``tests/cluster/test_communicator.py``'s NCCL
   test).
2. **kernels**: ``bench_kernels.py --quick``: the device's copy bandwidth and bf16 matrix rate, then MLA decode
   (V2-Lite shape, batch 1 and 64, context 1K and 4K) as a fraction of that bandwidth, and the fused MoE against
   the per-expert torch loop.
3. **engine**: a random checkpoint of DeepSeek-V2-Lite's shape (its widths, 64 experts top-6, 2 shared; fewer
   layers: ``--layers``, default 3 = 1 dense + 2 MoE), written in bf16; the engine in bf16 on CUDA (Triton
   kernels) against the fp32 engine on the CPU on the same weights: the prompts' logprobs (teacher-forced, so
   one early flip cannot hide the rest), and a few greedy tokens; then the CUDA engine's decode throughput
   (64 prompts, 128 in / 64 out).
4. **nccl**: all-to-all through ``NcclCommunicator``, one rank per GPU (NCCL refuses two ranks on one GPU):
   uneven random splits checked against the rows each rank must get, and the time of a large exchange.

Needs no Ray (the engine, the kernels and the communicator import without it) and nothing beyond the GPU
machine's image (torch, triton, cupy, safetensors, tokenizers, pytest). Writes ``gpu_check.json`` and each
part's log under ``--out`` and prints one summary table last. ``--small`` shrinks every part to a size a CPU
can run (``--device cpu``), which is how the suite tests this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "kernels", "engine", "nccl")
LIMITS_S = {"tests": 150, "kernels": 120, "engine": 150, "nccl": 60}  # together under 8 minutes
# bf16 against fp32 on the same weights: what the comparison calls a pass (first guesses, to be revised with
# the first figures from a GPU): the mean absolute difference of the prompt tokens' logprobs, in nats, and the
# share of greedy first tokens that agree
ENGINE_MEAN_DLOGP = 0.05
ENGINE_FIRST_TOKEN_AGREE = 0.75


# ---- the parts, each run in its own process ----------------------------------------------------------------------


def part_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
           "tests/cluster/test_communicator.py::test_nccl_one_rank_group", "-rs"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": last}


def part_kernels(args) -> dict:
    out = Path(args.out) / "bench_kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    if proc.returncode != 0 or not out.exists():
        return {"ok": False, "returncode": proc.returncode}
    data = json.loads(out.read_text())
    target = [r for r in data.get("mla_decode", []) if r["batch"] >= 64 and r["context"] >= 4096]
    return {"ok": True, "copy_gb_s": data["device"]["copy_gb_s"],
            "matmul_bf16_tflop_s": data["device"]["matmul_bf16_tflop_s"],
            "mla_worst_frac_of_copy": min((r["frac_of_copy"] for r in target), default=None),
            "moe_worst_speedup": min((r["speedup"] for r in data.get("fused_moe", [])), default=None)}


def lite_config(layers: int, small: bool) -> dict:
    """DeepSeek-V2-Lite's config with ``layers`` layers (the first dense, as in V2-Lite); ``small``: narrow
    widths and few experts, for a CPU."""
    from latentmoe.model.tiny import named_config

    cfg = named_config("deepseek-v2-lite")
    cfg.update(num_hidden_layers=layers, first_k_dense_replace=min(1, layers - 1))
    if small:
        cfg.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                   num_experts_per_tok=2, n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, vocab_size=1024)
    return cfg


def part_engine(args) -> dict:
    import random

    import torch

    from latentmoe import LLM, SamplingParams
    from latentmoe.model.tiny import make_tiny

    device = args.device
    t0 = time.perf_counter()
    ckpt = Path(tempfile.mkdtemp(prefix="gpu-check-lite-"))
    cfg = lite_config(args.layers, args.small)
    make_tiny(ckpt, seed=0, config=cfg, dtype=torch.bfloat16)
    write_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = cfg["vocab_size"]
    prompts = [[rng.randrange(100, vocab) for _ in range(n)] for n in ((5, 17, 33, 64) if args.small
                                                                        else (7, 64, 129, 300, 511))]
    compare = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    lens = dict(max_model_len=2048, max_num_batched_tokens=2048)
    t0 = time.perf_counter()
    gpu = LLM(model=str(ckpt), dtype="bfloat16", device=device, **lens)
    load_s = time.perf_counter() - t0
    got = gpu.generate(prompts, compare)
    cpu = LLM(model=str(ckpt), dtype="float32", device="cpu", **lens)
    ref = cpu.generate(prompts, compare)
    del cpu
    diffs, first_agree, tokens_agree = [], 0, []
    for g, r, p in zip(got, ref, prompts):
        for pos in range(1, len(p)):  # the first prompt token has no logprob
            diffs.append(abs(g.prompt_logprobs[pos][p[pos]] - r.prompt_logprobs[pos][p[pos]]))
        first_agree += g.token_ids[0] == r.token_ids[0]
        same = 0
        for a, b in zip(g.token_ids, r.token_ids):
            if a != b:
                break
            same += 1
        tokens_agree.append(same)
    mean_d, max_d = sum(diffs) / len(diffs), max(diffs)
    result = {"config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                             "num_experts_per_tok", "kv_lora_rank", "vocab_size")},
              "device": device, "write_checkpoint_s": round(write_s, 1), "load_s": round(load_s, 1),
              "prompt_logprob_abs_diff": {"mean": mean_d, "max": max_d, "n": len(diffs)},
              "first_token_agree": f"{first_agree}/{len(prompts)}",
              "greedy_tokens_agree_before_first_difference": tokens_agree}
    result["ok"] = mean_d <= ENGINE_MEAN_DLOGP and first_agree >= ENGINE_FIRST_TOKEN_AGREE * len(prompts)
    # decode throughput on the accelerator's engine
    n, n_in, n_out = (8, 16, 8) if args.small else (64, 128, 64)
    load = [[rng.randrange(100, vocab) for _ in range(n_in)] for _ in range(n)]
    bench = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
    gpu.generate(load[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up: kernels compiled
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = gpu.generate(load, bench)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result["throughput"] = {"prompts": n, "input_len": n_in, "output_len": n_out, "elapsed_s": round(elapsed, 2),
                            "output_tok_s": round(sum(len(o.token_ids) for o in outs) / elapsed, 1)}
    print(json.dumps(result, indent=1))
    return result


def _nccl_rank(rank: int, world: int, unique_id, rows: int, width: int, queue) -> None:
    import torch

    from latentmoe.cluster.communicator import NcclCommunicator

    torch.cuda.set_device(rank)
    comm = NcclCommunicator(rank, world, unique_id, device=rank)
    gen = torch.Generator().manual_seed(1234)  # every rank draws the same split table
    table = torch.randint(0, 64, (world, world), generator=gen).tolist()  # table[src][dst]: rows src sends dst
    send_splits = table[rank]
    recv_splits = [table[src][rank] for src in range(world)]
    # row j of what src sends dst holds the value src * 1e6 + dst * 1e3 + j, so each received row names itself
    send = torch.cat([torch.arange(table[rank][dst], dtype=torch.float32)[:, None].expand(-1, 8)
                      + rank * 1e6 + dst * 1e3 for dst in range(world)]).cuda()
    got = comm.all_to_all(send, send_splits, recv_splits)
    want = torch.cat([torch.arange(table[src][rank], dtype=torch.float32)[:, None].expand(-1, 8)
                      + src * 1e6 + rank * 1e3 for src in range(world)]).cuda()
    ok = bool(torch.equal(got, want)) and comm.exchange_counts(send_splits) == recv_splits
    big = torch.randn(rows * world, width, dtype=torch.bfloat16, device="cuda")
    even = [rows] * world
    for _ in range(3):
        comm.all_to_all(big, even, even)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        comm.all_to_all(big, even, even)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    comm.close()
    queue.put({"rank": rank, "ok": ok, "ms": ms, "bytes": big.numel() * big.element_size()})


def part_nccl(args) -> dict:
    import torch
    import torch.multiprocessing as mp

    from latentmoe.cluster.communicator import NcclCommunicator

    world = torch.cuda.device_count()
    if world < 1:
        return {"ok": False, "error": "no CUDA device"}
    rows, width = (4096, 2048) if not args.small else (64, 16)  # rows of a V2-Lite hidden state per peer
    unique_id = NcclCommunicator.new_unique_id()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, world, unique_id, rows, width, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=LIMITS_S["nccl"] - 10) for _ in procs]
    for p in procs:
        p.join(10)
    slowest = max(g["ms"] for g in got)
    per_rank = got[0]["bytes"]
    return {"ok": all(g["ok"] for g in got), "world": world, "bytes_per_rank": per_rank,
            "ms": round(slowest, 3), "gb_s_per_rank": round(per_rank / slowest / 1e6, 1),
            "note": "one GPU: each rank's rows only go to itself (a device copy through NCCL)" if world == 1 else ""}


# ---- the driver ----------------------------------------------------------------------------------------------------


def run_part(name: str, args) -> dict:
    """``name`` in a child process (this script with ``--part``), under its time limit; its log under --out."""
    out = Path(args.out)
    log = out / f"gpu_check_{name}.log"
    result_file = out / f"gpu_check_{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", name, "--out", str(out), "--device", args.device,
           "--layers", str(args.layers)] + (["--small"] if args.small else [])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=LIMITS_S[name],
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = json.loads(result_file.read_text()) if result_file.exists() else {"ok": False}
    result.update(wall_s=round(time.perf_counter() - t0, 1), exit=code)
    if code != 0:
        result["ok"] = False
        result["log_tail"] = log.read_text()[-1500:]
    return result


def summary_lines(results: dict) -> list[str]:
    lines = ["", "gpu_check summary", "-" * 72]
    for name, r in results.items():
        status = "ok" if r.get("ok") else "FAILED"
        if name == "tests":
            detail = r.get("summary", "")
        elif name == "kernels":
            detail = (f"copy {r.get('copy_gb_s', 0):.0f} GB/s, bf16 mm {r.get('matmul_bf16_tflop_s', 0):.0f} "
                      f"TFLOP/s, MLA worst {100 * (r.get('mla_worst_frac_of_copy') or 0):.0f} % of copy "
                      f"(target 80), MoE worst {r.get('moe_worst_speedup') or 0:.2f}x loop (target 2)"
                      if r.get("ok") else "")
        elif name == "engine":
            d = r.get("prompt_logprob_abs_diff", {})
            t = r.get("throughput", {})
            detail = (f"bf16 vs fp32 |dlogp| mean {d.get('mean', 0):.4f} max {d.get('max', 0):.3f},"
                      f" first tokens {r.get('first_token_agree')}, {t.get('output_tok_s')} tok/s"
                      if d else "")
        else:
            detail = (f"world {r.get('world')}, {r.get('gb_s_per_rank')} GB/s per rank, {r.get('ms')} ms"
                      if r.get("ok") else "")
        lines.append(f"{name:<8} {status:<7} {r.get('wall_s', 0):>6.1f} s  {detail}")
        if not r.get("ok") and r.get("log_tail"):
            lines.append("         " + r["log_tail"].strip().splitlines()[-1][:150])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "results/gpu_check")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run")
    ap.add_argument("--device", default="cuda", help="the engine part's device (cpu: with --small, for tests)")
    ap.add_argument("--layers", type=int, default=3, help="layers of the V2-Lite-shape checkpoint")
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes (how the suite runs this script)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # the checkout, not an installed copy: the GPU machine has none, and every child imports from here
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(ROOT))
    if args.part:  # a child: run one part, write its result
        result = globals()[f"part_{args.part}"](args)
        (Path(args.out) / f"gpu_check_{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")
        sys.exit(0)
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    results = {}
    for name in parts:
        print(f"gpu_check: {name} (limit {LIMITS_S[name]} s)", flush=True)
        results[name] = run_part(name, args)
    try:
        import torch

        env = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        env = {"error": repr(exc)}
    report = {"env": env, "parts": results, "ok": all(r.get("ok") for r in results.values())}
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary_lines(results)))
    print(f"{'all ok' if report['ok'] else 'SOME PARTS FAILED'}; details in {Path(args.out) / 'gpu_check.json'}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
