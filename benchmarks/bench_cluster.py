"""The disaggregated cluster against the single-process engine, on the same requests.

    python benchmarks/bench_cluster.py [--model DIR] [--attention-shards 1] [--expert-shards 2]
                                       [--num-prompts 16] [--input-len 64] [--output-len 32]
                                       [--micro-batches 1,2] [--padded-dispatch-tokens 0,256]
                                       [--kernels auto,torch]

Starts a Ray cluster on this machine (a head, attention nodes and expert nodes, each a
separate raylet), runs the requests greedily through both engines, checks they give the same
tokens, and prints generated tokens/s for both, plus the cluster's time per step split into:
attention compute (attention shard time outside the collectives), expert compute (time in the
experts on the slowest expert shard), all-to-all (attention time in the collectives, less the
expert compute it waited for), from the step loops' own counters (no actor drives the steps).
With several ``--micro-batches`` settings the cluster runs once per setting, one after the other on
the same cluster (1: one batch per step; 2: ping-pong micro-batches; 0: by batch size). With two
micro-batches the expert and collective times are lane-seconds (both lanes' counted), so the busy
fractions can pass 1 where the lanes overlap. With several ``--kernels`` (``EngineConfig.kernels``) both
engines run once per setting, single process first (on the CPU, ``auto`` is the Numba MLA decode and
``torch`` the references). Saves everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path


def shard_timings(llm) -> dict:
    """The step loops' own counters: the slowest attention shard and the slowest expert shard."""
    import ray

    attention = [ray.get(a.stats.remote(), timeout=60)["timings"] for a in llm.attention]
    experts = [ray.get(h.state.remote(), timeout=60) for h, _ in
               ray.get(llm.coordinator.shards.remote(), timeout=60)["expert"]]
    slowest = max(attention, key=lambda t: t["step_s"])
    expert = max(experts, key=lambda t: t["compute_s"])
    return {"attention": {k: slowest.get(k, 0) for k in ("step_s", "a2a_s", "num_steps", "lanes")},
            "expert": {k: expert[k] for k in ("step_s", "compute_s", "num_steps")}}


def run_cluster(args, model, prompts, params, timed, micro_batches: int, padded_dispatch_tokens: int,
                kernels: str) -> dict:
    """One timed run on the cluster with ``micro_batches``, ``padded_dispatch_tokens`` and ``kernels``; -> its
    figures (and its outputs, under "outputs")."""
    from latentmoe import LLM, SamplingParams

    llm = LLM(model=model, attention_shards=args.attention_shards, expert_shards=args.expert_shards,
              micro_batches=micro_batches, padded_dispatch_tokens=padded_dispatch_tokens, kernels=kernels)
    try:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))
        before = shard_timings(llm)
        outs, run = timed(llm)
        after = shard_timings(llm)
        steps = after["attention"]["num_steps"] - before["attention"]["num_steps"]
        delta = {side: {k: after[side][k] - before[side][k] for k in after[side]} for side in after}
        attention_s, a2a_s = delta["attention"]["step_s"], delta["attention"]["a2a_s"]
        expert_s, compute_s = delta["expert"]["step_s"], delta["expert"]["compute_s"]
        run["per_step_ms"] = {
            "attention_step": 1e3 * attention_s / steps,  # one attention shard's step loop, the slowest
            "attention_compute": 1e3 * (attention_s - a2a_s) / steps,
            "expert_compute": 1e3 * compute_s / steps,
            # the attention shard in its exchanges: sending, receiving, and the experts' work that the shared experts
            # (computed between the send and the receive) did not hide
            "attention_waiting": 1e3 * a2a_s / steps,
            "expert_busy_fraction": compute_s / expert_s if expert_s else 0.0,
            "attention_busy_fraction": (attention_s - a2a_s) / attention_s if attention_s else 0.0,
        }
        run |= {"steps": steps, "ray_calls_per_step": 0, "micro_batches_per_step":
                delta["attention"].get("lanes", steps) / steps, "dispatch": llm.dispatch_stats(), "outputs": outs}
        return run
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="checkpoint directory, or bench (bench_serve's checkpoint; default: the built-in tiny model)")
    ap.add_argument("--attention-shards", type=int, default=1)
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--omp-wait-policy", default=None, choices=["ACTIVE", "PASSIVE"],
                    help="OMP_WAIT_POLICY for the shards (default: theirs, PASSIVE); the single process keeps this "
                         "process's")
    ap.add_argument("--micro-batches", default="1,2", help="comma-separated EngineConfig.micro_batches settings")
    ap.add_argument("--padded-dispatch-tokens", default="256",
                    help="comma-separated EngineConfig.padded_dispatch_tokens settings (0: three exchanges per layer)")
    ap.add_argument("--kernels", default="auto", help="comma-separated EngineConfig.kernels settings")
    ap.add_argument("--out", default="results/bench_cluster.json")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from latentmoe import LLM, SamplingParams
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_node
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import model_from_arg

    model = model_from_arg(args.model)
    rng = random.Random(0)
    kernel_settings = args.kernels.split(",")
    singles = {k: LLM(model=model, kernels=k) for k in kernel_settings}
    vocab = singles[kernel_settings[0]].engine.model_config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def timed(llm):
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        return outs, {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}

    result = {"model": model, **vars(args), "machine": platform.machine(), "cpus": os.cpu_count(),
              "loadavg_before": os.getloadavg()}
    single_outs, result["single_process"] = {}, {}
    for k, single in singles.items():
        single_outs[k], result["single_process"][k] = timed(single)
        print(f"single process kernels={k}: {result['single_process'][k]['tokens_per_s']:.1f} tok/s")
        same = sum(a.token_ids == b.token_ids for a, b in zip(single_outs[k], single_outs[kernel_settings[0]]))
        result["single_process"][k]["identical_outputs_to_first"] = f"{same}/{len(prompts)}"
    del singles

    if args.omp_wait_policy:  # the shard actors' runtime_env takes it from here (shard_runtime_env)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(args.attention_shards):
        cluster.add_node(num_cpus=1, **role_node(ATTENTION_RESOURCE, 1))
    for _ in range(args.expert_shards):
        cluster.add_node(num_cpus=1, **role_node(EXPERT_RESOURCE, 1))
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        result["cluster"] = {}
        settings = [(k, int(m), int(p)) for k in kernel_settings for m in args.micro_batches.split(",")
                    for p in args.padded_dispatch_tokens.split(",")]
        for kernels, setting, padded in settings:
            name = f"kernels={kernels} micro_batches={setting} padded_dispatch_tokens={padded}"
            result["cluster"][name] = run = run_cluster(args, model, prompts, params, timed, setting, padded, kernels)
            same = sum(a.token_ids == b.token_ids for a, b in zip(single_outs[kernels], run.pop("outputs")))
            run["identical_outputs"] = f"{same}/{len(prompts)}"
            single_tps = result["single_process"][kernels]["tokens_per_s"]
            run["ratio_cluster_over_single"] = run["tokens_per_s"] / single_tps
            print(f"cluster A={args.attention_shards} E={args.expert_shards} {name}: "
                  f"{run['tokens_per_s']:.1f} tok/s ({run['ratio_cluster_over_single']:.2f}x single process; "
                  f"identical outputs {same}/{len(prompts)})")
            print("  per step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in run["per_step_ms"].items()))
    finally:
        ray.shutdown()
        cluster.shutdown()
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
