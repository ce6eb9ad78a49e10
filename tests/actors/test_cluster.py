"""The disaggregated cluster on a real multi-node Ray cluster on this machine, against the single-process engine.

One Ray cluster for the module: a head, an attention node and two expert nodes, each advertising its role.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time

import pytest
import ray

from latentmoe import LLM, SamplingParams
from latentmoe.actors.cluster import has_role_nodes
from latentmoe.cluster.shards import usable_cores
from latentmoe.model.tiny import TINY_CONFIG, make_tiny
from tests.actors.clusters import role_cluster

TIMEOUT = 120
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def cluster():
    with role_cluster(expert_nodes=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(2, 1024) for _ in range(n)] for n in (1, 200, 7, 64, 3, 129, 31, 12)]


@pytest.fixture(scope="module")
def expected(tiny_dir, prompts):
    llm = LLM(model=str(tiny_dir))
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


async def staggered(client, prompts, params) -> list[list[int]]:
    """Half the requests first; the rest arrive once the first is decoding. Every stream's deltas add up to
    its final output."""

    async def collect(stream, first=None):
        tokens, last = [], None
        if first is not None:
            tokens, last = list(first.delta_token_ids), first
        async for last in stream:
            tokens += last.delta_token_ids
        assert last is not None and last.finished
        assert tokens == last.token_ids
        return tokens

    first = [client.generate(p, params) for p in prompts[:4]]
    head = await asyncio.wait_for(first[0].__anext__(), TIMEOUT)
    assert not head.finished
    rest = [client.generate(p, params) for p in prompts[4:]]
    return await asyncio.wait_for(asyncio.gather(collect(first[0], head), *(collect(s) for s in first[1:] + rest)),
                                  TIMEOUT)


@pytest.mark.parametrize("num_attention,num_expert,micro_batches,padded",
                         [(1, 1, 1, 256), (1, 2, 1, 256), (1, 2, 1, 0), (1, 2, 2, 256), (1, 4, 1, 256), (2, 1, 1, 256),
                          (2, 2, 1, 256), (2, 2, 1, 0), (2, 2, 2, 256), (2, 4, 1, 256)])
def test_cluster_equals_single_process(cluster, tiny_dir, prompts, expected, num_attention, num_expert,
                                       micro_batches, padded):
    """``micro_batches=2``: every step as two micro-batches on two lanes (ping-pong), the same tokens;
    ``padded`` 0: three exchanges per MoE layer, else decode passes padded after the first MoE layer."""
    llm = LLM(model=str(tiny_dir), attention_shards=num_attention, expert_shards=num_expert, block_size=16,
              num_blocks=64, timeout_s=TIMEOUT, micro_batches=micro_batches, padded_dispatch_tokens=padded)
    try:
        info = llm.shards()
        # the actors really are on the nodes of their role
        assert {s["node_id"] for s in info["attention"]} <= cluster["attention"]
        assert {s["node_id"] for s in info["expert"]} <= cluster["expert"]
        assert len(info["attention"]) == num_attention and len(info["expert"]) == num_expert

        assert asyncio.run(staggered(llm.router, prompts, GREEDY)) == expected
        # the outputs came back batched: at most one message per step per attention shard, not one per token
        # (the shard's own step count goes up before it sends a step's outputs; the step loop's after)
        messages, steps = llm.router.inbox.num_messages, sum(st["timings"]["num_steps"] for st in llm.shard_stats())
        assert 0 < messages <= steps < sum(len(t) for t in expected), (messages, steps)

        # the batch API gives the same, and bad input is a ValueError that leaves the cluster serving
        assert [o.token_ids for o in llm.generate(prompts[:3], GREEDY)] == expected[:3]
        with pytest.raises(ValueError, match="prompt is empty"):
            llm.generate([[]], GREEDY)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[5, 10**6]], GREEDY)
        assert llm.generate([prompts[2]], GREEDY)[0].token_ids == expected[2]

        stats = llm.dispatch_stats()
        num_moe_layers = len([i for i in range(TINY_CONFIG["num_hidden_layers"])
                              if i >= TINY_CONFIG["first_k_dense_replace"]])
        assert sorted(stats["tokens_per_expert"]) == [str(i) for i in range(1, 1 + num_moe_layers)]
        histogram = stats["devices_histogram"]
        reached = max(n for n, count in enumerate(histogram) if count)
        assert reached <= min(num_expert, TINY_CONFIG["topk_group"])  # groups whole on shards: at most M devices
        assert histogram[0] == 0  # every token reaches some expert shard
        # what the communicators moved: one row per (token, layer, shard reached), a float32 hidden state with
        # its K slot ids and weights there and a float32 partial sum back
        D, K = TINY_CONFIG["hidden_size"], TINY_CONFIG["num_experts_per_tok"]
        rows = sum(n * c for n, c in enumerate(histogram))
        assert stats["ideal_bytes"] == rows * (2 * D * 4 + 2 * K * 4) > 0
        assert stats["a2a_bytes"] == stats["ideal_bytes"] + stats["a2a_padding_bytes"]
        assert (stats["a2a_padding_bytes"] > 0) == (padded > 0)  # decode passes padded, or none

        cache = llm.cache_stats()
        assert cache["num_free_blocks"] == cache["num_blocks"] == 64 * num_attention
        stats = llm.shard_stats()
        if micro_batches == 2:  # the steps really ran as two micro-batches
            timings = [st["timings"] for st in stats]
            assert all(t["lanes"] == 2 * t["num_steps"] for t in timings), timings
        # the shards run decode on their one Ray CPU's thread, and the passes of 128 tokens or more (the prompts of
        # 200 and 129) on every core they may use (EngineConfig.prefill_threads 0): the same tokens either way
        cores = usable_cores()
        assert [(st["threads"], st["prefill_threads"]) for st in stats] == [(1, cores)] * num_attention
        assert (sum(st["timings"]["prefill_passes"] for st in stats) > 0) == (cores > 1)
    finally:
        llm.shutdown()


def make_layers(tmp_path_factory, num_layers: int):
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["num_hidden_layers"] = num_layers
    return make_tiny(tmp_path_factory.mktemp(f"layers{num_layers}"), seed=3, config=cfg)


def test_shards_step_in_lockstep_without_ray_calls(cluster, tmp_path_factory):
    """Every member of the group runs the same steps, on its own: the attention shards' step loops and the
    expert shards' count the same number, whatever the number of layers; the coordinator is not called per
    step (its few calls are membership and about one load report a second)."""
    for layers in (2, 6):
        llm = LLM(model=str(make_layers(tmp_path_factory, layers)), attention_shards=2, expert_shards=2,
                  num_blocks=16, timeout_s=TIMEOUT)
        try:
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            idle_before = [ray.get(a.stats.remote(), timeout=TIMEOUT)["num_idle_rounds"] for a in llm.attention]
            llm.generate([[5, 6, 7], [8, 9]], params)
            deadline = time.time() + 10
            while True:  # the last step's count is taken just after its outputs went out
                attention = [ray.get(a.stats.remote(), timeout=TIMEOUT) for a in llm.attention]
                experts = [ray.get(h.state.remote(), timeout=TIMEOUT) for h, _ in
                           ray.get(llm.coordinator.shards.remote(), timeout=TIMEOUT)["expert"]]
                steps = {a["num_steps"] for a in attention} | {e["num_steps"] for e in experts}
                if len(steps) == 1 or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert len(steps) == 1, (attention, experts)  # lockstep: the same steps everywhere
            # one prefill step and nine decode steps for each request; with two requests on two shards they
            # may be spread (10 steps) or each shard may hold one (still 10 lockstep steps)
            assert steps == {10}, steps
            # parked once idle: after the work, every member went through a round that found no work
            deadline = time.time() + 10
            while True:
                idle = [ray.get(a.stats.remote(), timeout=TIMEOUT)["num_idle_rounds"] for a in llm.attention]
                if all(n > b for n, b in zip(idle, idle_before)) or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert all(n > b for n, b in zip(idle, idle_before)), (idle_before, idle)
            assert all(a["num_steps"] == 10 for a in attention)
        finally:
            llm.shutdown()


def test_placement_fallback_and_limits(cluster, tiny_dir, caplog):
    # this cluster says what its nodes are
    assert has_role_nodes()
    # more shards than the cluster can hold: a clear error after the timeout, never a hang
    with pytest.raises(Exception, match="could not be placed"):
        LLM(model=str(tiny_dir), attention_shards=5, expert_shards=4, timeout_s=5)


# --- expert load balancing (#18) ----------------------------------------------------------------------------------

SKEW_PROMPTS = 12


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory):
    """Routing skewed towards experts 0, 1 and 4 (and 3 with them): groups 0 and 1, both on shard 0 of two."""
    return make_tiny(tmp_path_factory.mktemp("skewed"), seed=0, hot_experts=[0, 1, 4], skew=0.5)


def work_imbalance(pairs: list[int]) -> float:
    """Max over mean (token, expert) pairs computed per expert shard, from the counts alone."""
    return max(pairs) * len(pairs) / sum(pairs)


@pytest.mark.parametrize("mode,redundant", [("repack", 0), ("copies", 2)])
def test_rebalancing_with_streams_in_flight(cluster, skewed_dir, mode, redundant):
    """On the skewed checkpoint: the expert shards' work imbalance measured, a rebalance while streams are in
    flight (the expert shards load their new slots, then one epoch switch), every stream's greedy tokens those
    of the single process, the imbalance measured again lower, and never more than topk_group shards a token."""
    rng = random.Random(11)
    prompts = [[rng.randrange(2, 1024) for _ in range(rng.randrange(8, 40))] for _ in range(SKEW_PROMPTS)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model=str(skewed_dir)).generate(prompts, params)]
    llm = LLM(model=str(skewed_dir), attention_shards=1, expert_shards=2, redundant_experts=redundant,
              block_size=16, num_blocks=128, timeout_s=TIMEOUT)
    try:
        assert llm.expert_placement()["version"] == 0
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        before = llm.dispatch_stats()["pairs_per_shard"]
        deadline = time.time() + 15  # the shard's load report reaches the coordinator within about a second
        while ray.get(llm.coordinator.expert_load.remote(600.0), timeout=TIMEOUT)["pairs_per_shard"] != before:
            assert time.time() < deadline, "the load report did not reach the coordinator"
            time.sleep(0.2)
        imbalance_before = work_imbalance(before)
        # the checkpoint really is skewed (copies spread round-robin before any load is measured even it out a bit)
        assert imbalance_before > (1.3 if redundant == 0 else 1.15), before

        async def rebalance_under_streams():
            streams = [llm.router.generate(p, params) for p in prompts]
            firsts = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), TIMEOUT)
            report = await asyncio.wait_for(llm.coordinator.rebalance.remote(True, 600.0, mode), TIMEOUT)

            async def rest(stream, first):
                tokens = list(first.delta_token_ids)
                async for out in stream:
                    tokens += out.delta_token_ids
                return tokens

            return report, await asyncio.wait_for(asyncio.gather(*(rest(s, f) for s, f in zip(streams, firsts))),
                                                  TIMEOUT)

        report, outputs = asyncio.run(rebalance_under_streams())
        assert outputs == expected  # nothing lost, duplicated or changed across the switch
        assert report["changed"] and report["version"] == 1, report
        assert report["imbalance_predicted"] < report["imbalance_before"], report
        placement = llm.expert_placement()
        assert placement["version"] == 1 and placement["rebalances"][-1]["version"] == 1
        assert (placement["num_copies"] > 0) == (redundant > 0), placement
        assert all(len(slots) == 8 + redundant for slots in placement["slots"])

        # after the switch: the same prompts again, the work per shard measured from the dispatch counters
        mid = llm.dispatch_stats()["pairs_per_shard"]
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        stats = llm.dispatch_stats()
        after = [b - a for a, b in zip(mid, stats["pairs_per_shard"])]
        print(f"\n{mode}, redundant {redundant}: work per expert shard {before} -> {after}, imbalance "
              f"{imbalance_before:.3f} -> {work_imbalance(after):.3f}; rebalance {report}")
        assert work_imbalance(after) < imbalance_before - 0.05, (before, after)
        reached = max(n for n, count in enumerate(stats["devices_histogram"]) if count)
        assert reached <= TINY_CONFIG["topk_group"], stats["devices_histogram"]  # copies add no shard
        if mode == "copies":  # the primaries stayed: every token reaches the same shards as before
            assert placement["primary_shard"] == [e // 8 for e in range(16)], placement
        cache = llm.cache_stats()
        assert cache["num_free_blocks"] == cache["num_blocks"]
        # nothing left to gain: a rebalance without force changes nothing and says why
        again = llm.rebalance(force=False, window_s=5.0)
        assert not again["changed"] and again["reason"], again
    finally:
        llm.shutdown()


def test_expert_shards_two_to_four_and_back_with_streams_in_flight(cluster, tiny_dir):
    """E 2 -> 4 -> 2 under load: each change with streams in flight (new shards start with their slices, the
    staying ones load theirs, one switch, the shards no longer needed stop); every stream's greedy tokens those
    of the single process; after each change every expert shard of the new number computes, the others none."""
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 1024) for _ in range(rng.randrange(4, 24))] for _ in range(8)]
    # long enough to outlast starting two shards (8-10 s) on an idle machine too: 300 tokens once ended before it
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model=str(tiny_dir)).generate(prompts, params)]
    llm = LLM(model=str(tiny_dir), attention_shards=1, expert_shards=2, block_size=16, num_blocks=1024,
              timeout_s=TIMEOUT)

    async def change_under_streams(num_expert: int):
        streams = [llm.router.generate(p, params) for p in prompts]
        firsts = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), TIMEOUT)

        async def rest(stream, first):
            tokens = list(first.delta_token_ids)
            async for out in stream:
                tokens += out.delta_token_ids
            return tokens

        tasks = [asyncio.ensure_future(rest(s, f)) for s, f in zip(streams, firsts)]
        report = await asyncio.wait_for(llm.coordinator.scale_experts.remote(num_expert, 600.0), TIMEOUT)
        in_flight = sum(not t.done() for t in tasks)
        return report, in_flight, await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

    try:
        assert [o.token_ids for o in llm.generate(prompts[:2], params)] == expected[:2]
        for num_expert in (4, 2):
            epoch = ray.get(llm.coordinator.status.remote(), timeout=TIMEOUT)["epoch"]
            report, in_flight, outputs = asyncio.run(change_under_streams(num_expert))
            print(f"\n{report['expert_shards_before']} -> {num_expert} expert shards, {in_flight} of {len(prompts)} "
                  f"streams in flight after it: {report}")
            assert in_flight > 0  # the switch came while the streams ran
            assert outputs == expected  # nothing lost, duplicated or changed across the switch
            assert report["changed"] and report["expert_shards"] == num_expert, report
            assert report["epoch"] == epoch + 1  # one switch, no fault on the way
            assert report["balanced_on_load"]  # the load of the streams before it placed the experts
            status = ray.get(llm.coordinator.status.remote(), timeout=TIMEOUT)
            assert status["expert_shards"] == num_expert and status["error"] is None
            slots = sorted(info["slot"] for info in llm.shards()["expert"])
            assert slots == list(range(num_expert))
            placement = llm.expert_placement()
            assert len(placement["slots"]) == num_expert and set(placement["primary_shard"]) == set(range(num_expert))

            before = llm.dispatch_stats()["pairs_per_shard"]
            assert [o.token_ids for o in llm.generate(prompts, params)] == expected
            after = llm.dispatch_stats()["pairs_per_shard"]
            work = [b - (before[i] if i < len(before) else 0) for i, b in enumerate(after)]
            assert all(n > 0 for n in work[:num_expert]) and not any(work[num_expert:]), work
            reached = max(n for n, c in enumerate(llm.dispatch_stats()["devices_histogram"]) if c)
            assert reached <= TINY_CONFIG["topk_group"]
        cache = llm.cache_stats()
        assert cache["num_free_blocks"] == cache["num_blocks"]
        # idle (every member parked): the shard that goes takes part in the switching round too
        for num_expert in (1, 2):
            epoch = ray.get(llm.coordinator.status.remote(), timeout=TIMEOUT)["epoch"]
            report = llm.scale_experts(num_expert)
            assert report["changed"] and report["epoch"] == epoch + 1, report
            assert [o.token_ids for o in llm.generate(prompts[:2], params)] == expected[:2]
        # no collective failed on the way (a shard left out and parked would hold the switching round until the
        # collective timeout: the others time out, then join the group they were told of)
        experts = ray.get(llm.coordinator.shards.remote(), timeout=TIMEOUT)["expert"]
        assert [ray.get(h.state.remote(), timeout=TIMEOUT)["num_faults"] for h, _ in experts] == [0, 0]
        assert [st["num_faults"] for st in llm.shard_stats()] == [0]
        again = llm.scale_experts(2)
        assert not again["changed"] and "already" in again["reason"]
        with pytest.raises(ray.exceptions.RayTaskError, match="num_expert must be a positive integer"):
            llm.scale_experts(0)
        with pytest.raises(ray.exceptions.RayTaskError, match="3 expert shards cannot hold 4 expert groups whole"):
            llm.scale_experts(3)  # a token would no longer reach at most topk_group shards
        assert ray.get(llm.coordinator.status.remote(), timeout=TIMEOUT)["expert_shards"] == 2
    finally:
        llm.shutdown()


def test_a_policy_sets_the_number_of_expert_shards(cluster, tiny_dir):
    """expert_shards_policy: the built-in shards_for_work with a target so low that any load asks for its most,
    then a short window that empties when idle: 2 -> 4 under load, back to 2 when idle; replies unchanged."""
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 1024) for _ in range(12)] for _ in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model=str(tiny_dir)).generate(prompts, params)]
    llm = LLM(model=str(tiny_dir), attention_shards=1, expert_shards=2, block_size=16, num_blocks=128,
              timeout_s=TIMEOUT, eplb_interval_s=1.0, eplb_window_s=4.0, eplb_threshold=1000.0,  # no rebalancing
              expert_shards_policy="latentmoe.cluster.eplb:shards_for_work",
              expert_shards_policy_args={"target_pairs_per_s": 1.0, "min_shards": 2, "max_shards": 4})

    def expert_shards() -> int:
        return ray.get(llm.coordinator.status.remote(), timeout=TIMEOUT)["expert_shards"]

    try:
        deadline = time.time() + TIMEOUT
        while expert_shards() != 4:  # under load the policy asks for 4
            assert [o.token_ids for o in llm.generate(prompts, params)] == expected
            assert time.time() < deadline, "the policy did not add expert shards"
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        def changes() -> list[tuple[int, int]]:  # the changes made, once each has finished
            return [(r["expert_shards_before"], r["expert_shards"]) for r in llm.expert_placement()["rebalances"]
                    if r.get("kind") == "expert_shards"]

        deadline = time.time() + TIMEOUT
        while changes()[-1:] != [(4, 2)]:  # idle: the window empties, the policy asks for its least
            assert time.time() < deadline, f"the policy did not remove expert shards: {changes()}"
            time.sleep(0.5)
        assert changes()[-2:] == [(2, 4), (4, 2)] and expert_shards() == 2
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    finally:
        llm.shutdown()
