"""Expert load balancing on a checkpoint with skewed routing: the cluster before and after a rebalance.

    python benchmarks/bench_eplb.py [--runs repack:0,repack:2,copies:2] [--num-prompts 32] [--input-len 64]
                                    [--output-len 48] [--expert-shards 2] [--scale-to 4] [--skew 0.5]
                                    [--out results/bench_eplb.json]

The checkpoint is bench_serve's (hidden 512, 4 layers, 16 routed experts in 4 groups, top-2 groups, top-4) with
routing skewed towards experts 0, 1 and 4 (``make_tiny(hot_experts, skew)``), written once under
``$LATENTMOE_CACHE``. On a Ray cluster of this machine (a head, an attention node, one node per expert shard),
for each ``--runs`` setting (eplb_mode and redundant expert slots per shard): a timed greedy run, a rebalance from
the load it measured (the coordinator's ``rebalance``: plan, the expert shards loading their new slots, the epoch
switch), and the same run again. Per run: generated tokens/s, the attention shard's step time, each expert
shard's compute per step (the slowest sets the step), and the expert shards' work ((token, expert) pairs) and
its imbalance (max / mean). With ``--scale-to N``, also the number of expert shards changed at run time
(``scale_experts``): runs on ``--expert-shards``, the change to N (and its parts: the new shards up, the staying
ones loading, the switch, the old ones stopped), runs on N, the change back. Checks that every run gives the single
process's tokens. Saves everything as JSON.
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

HOT_EXPERTS = (0, 1, 4)


def skewed_model_dir(skew: float, seed: int = 0) -> Path:
    from bench_serve import bench_config

    from latentmoe.model.tiny import cached_tiny

    return cached_tiny(f"bench-eplb-skew{skew:g}-seed{seed}", seed=seed, config=bench_config(),
                       hot_experts=HOT_EXPERTS, skew=skew)


def counters(llm) -> dict:
    import ray

    attention = [ray.get(a.stats.remote(), timeout=60)["timings"] for a in llm.attention]
    experts = [ray.get(h.state.remote(), timeout=60) for h, _ in
               ray.get(llm.coordinator.shards.remote(), timeout=60)["expert"]]
    stats = llm.dispatch_stats()
    return {"attention_step_s": max(t["step_s"] for t in attention), "steps": attention[0]["num_steps"],
            "a2a_s": max(t["a2a_s"] for t in attention), "expert_compute_s": [e["compute_s"] for e in experts],
            "pairs_per_shard": stats["pairs_per_shard"], "devices_histogram": stats["devices_histogram"],
            "a2a_bytes": stats["a2a_bytes"]}


def timed_run(llm, prompts, params) -> tuple[list, dict]:
    before = counters(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = counters(llm)
    steps = after["steps"] - before["steps"]
    compute = [b - a for a, b in zip(before["expert_compute_s"], after["expert_compute_s"])]
    # the expert shards in force (the counters keep the shards a change removed: zeros since)
    pairs = [b - a for a, b in zip(before["pairs_per_shard"], after["pairs_per_shard"])][:len(compute)]
    tokens = sum(len(o.token_ids) for o in outs)
    hist = [b - a for a, b in zip(before["devices_histogram"], after["devices_histogram"])]
    return outs, {
        # a balanced placement may send a token to more shards (its groups no longer together): more rows
        "mean_devices_per_token": round(sum(n * c for n, c in enumerate(hist)) / max(1, sum(hist)), 3),
        "a2a_mib": round((after["a2a_bytes"] - before["a2a_bytes"]) / 2**20, 2),
        "all_to_all_ms_per_step": round(1e3 * (after["a2a_s"] - before["a2a_s"] - max(compute)) / steps, 2),
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1), "steps": steps,
        "step_ms": round(1e3 * (after["attention_step_s"] - before["attention_step_s"]) / steps, 2),
        "expert_compute_ms_per_step": [round(1e3 * c / steps, 2) for c in compute],
        "slowest_expert_compute_ms_per_step": round(1e3 * max(compute) / steps, 2),
        "pairs_per_shard": pairs, "work_imbalance": round(max(pairs) * len(pairs) / sum(pairs), 4)}


def repeated(llm, prompts, params, repeats: int) -> tuple[list, dict]:
    """``repeats`` timed runs: the run of median tokens/s, with every run's tokens/s and step time."""
    runs = [timed_run(llm, prompts, params) for _ in range(repeats)]
    ranked = sorted(runs, key=lambda r: r[1]["tokens_per_s"])
    outs, median = ranked[len(ranked) // 2]
    return outs, median | {"all_tokens_per_s": [r[1]["tokens_per_s"] for r in runs],
                           "all_step_ms": [r[1]["step_ms"] for r in runs]}


def scale_run(model: str, prompts, params, expected, args) -> dict:
    """Runs on ``--expert-shards``, the change to ``--scale-to``, runs there, the change back (no redundant slots)."""
    from latentmoe import LLM, SamplingParams

    llm = LLM(model=model, attention_shards=1, expert_shards=args.expert_shards)
    try:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        outs, before = repeated(llm, prompts, params, args.repeats)
        time.sleep(1.5)  # the load the new placement is balanced on reaches the coordinator
        change = llm.scale_experts(args.scale_to, window_s=600.0)
        outs_at, at = repeated(llm, prompts, params, args.repeats)
        back = llm.scale_experts(args.expert_shards, window_s=600.0)
        same = [sum(o.token_ids == e for o, e in zip(run, expected)) for run in (outs, outs_at)]
        run = {"before": before, "change": change, "after": at, "change_back": back,
               "identical_outputs": f"{same[0]}/{len(prompts)} on {args.expert_shards}, {same[1]}/{len(prompts)} on "
                                    f"{args.scale_to}",
               "speedup": round(at["tokens_per_s"] / before["tokens_per_s"], 3)}
        print(f"{args.expert_shards} -> {args.scale_to} expert shards: {before['tokens_per_s']} -> "
              f"{at['tokens_per_s']} tok/s ({run['speedup']}x); step {before['step_ms']} -> {at['step_ms']} ms; "
              f"slowest expert shard {before['slowest_expert_compute_ms_per_step']} -> "
              f"{at['slowest_expert_compute_ms_per_step']} ms/step; the change {change['total_s']} s (new shards up "
              f"{change['start_s']} s, loading {change['load_s']} s, switch {change['switch_s']} s), back "
              f"{back['total_s']} s (switch {back['switch_s']} s, stop {back['stop_s']} s); identical outputs "
              f"{run['identical_outputs']}")
        return run
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="repack:0,repack:2,copies:2",
                    help="comma-separated MODE:REDUNDANT (eplb_mode, redundant slots per expert shard)")
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--scale-to", type=int, default=0, help="also change the number of expert shards to this and "
                    "back at run time, timing each change (0: no)")
    ap.add_argument("--skew", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs before and after (the medians count)")
    ap.add_argument("--out", default="results/bench_eplb.json")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from latentmoe import LLM, SamplingParams
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_node

    model = str(skewed_model_dir(args.skew))
    rng = random.Random(0)
    single = LLM(model=model)
    vocab = single.engine.model_config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in single.generate(prompts, params)]
    del single

    result = {"model": model, **vars(args), "hot_experts": HOT_EXPERTS, "machine": platform.machine(),
              "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "runs": {}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, **role_node(ATTENTION_RESOURCE, 1))
    for _ in range(max(args.expert_shards, args.scale_to)):
        cluster.add_node(num_cpus=1, **role_node(EXPERT_RESOURCE, 1))
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        for setting in args.runs.split(","):
            mode, redundant = setting.split(":")[0], int(setting.split(":")[1])
            llm = LLM(model=model, attention_shards=1, expert_shards=args.expert_shards, redundant_experts=redundant)
            try:
                llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
                outs, before = repeated(llm, prompts, params, args.repeats)
                time.sleep(1.5)  # the attention shard's last load report reaches the coordinator
                report = llm.rebalance(force=True, window_s=600.0, mode=mode)
                outs_after, after = repeated(llm, prompts, params, args.repeats)
                same = sum(o.token_ids == e for o, e in zip(outs, expected))
                same_after = sum(o.token_ids == e for o, e in zip(outs_after, expected))
                run = {"before": before, "rebalance": report, "after": after,
                       "identical_outputs": f"{same}/{len(prompts)} before, {same_after}/{len(prompts)} after",
                       "speedup": round(after["tokens_per_s"] / before["tokens_per_s"], 3),
                       "placement": llm.expert_placement()}
                result["runs"][f"{mode}, redundant={redundant}"] = run
                print(f"{mode}, redundant {redundant}: work imbalance {before['work_imbalance']:.3f} -> "
                      f"{after['work_imbalance']:.3f}; slowest expert shard "
                      f"{before['slowest_expert_compute_ms_per_step']} -> "
                      f"{after['slowest_expert_compute_ms_per_step']} ms/step; step {before['step_ms']} -> "
                      f"{after['step_ms']} ms; devices per token {before['mean_devices_per_token']} -> "
                      f"{after['mean_devices_per_token']}; {before['tokens_per_s']} -> {after['tokens_per_s']} tok/s "
                      f"({run['speedup']}x); rebalance {report.get('total_s')} s (load {report.get('load_s')} s, "
                      f"switch {report.get('switch_s')} s); identical outputs {run['identical_outputs']}")
            finally:
                llm.shutdown()
        if args.scale_to:
            result["expert_shard_change"] = scale_run(model, prompts, params, expected, args)
    finally:
        ray.shutdown()
        cluster.shutdown()
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"saved {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve's checkpoint config
    main()
