"""Shard faults on a real multi-node Ray cluster on this machine, with streaming requests in flight.

One cluster for the module: a head, an attention node (two attention shards) and an expert node (two
expert shards). Each test starts several streaming requests, injects a fault once they are decoding,
and checks that every request ends with exactly the greedy tokens of a run without the fault (the
single-process engine), with no token repeated or missing in its stream, and that the latent cache
returns to idle.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import ray

from latentmoe import LLM, SamplingParams
from latentmoe.actors.cluster import start_router
from latentmoe.engine.engine_config import EngineConfig
from tests.actors.clusters import role_cluster

TIMEOUT = 120
PARAMS = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with role_cluster(expert_nodes=1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def router(cluster, tiny_dir):
    config = EngineConfig.from_dict({"model": str(tiny_dir), "block_size": 16, "num_blocks": 96})
    import dataclasses

    handle, _ = start_router(dataclasses.asdict(config), 2, 2, timeout_s=TIMEOUT, step_timeout_s=8.0,
                             recovery_timeout_s=90.0)
    yield handle
    ray.get(handle.shutdown.remote(), timeout=60)
    ray.kill(handle)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [[rng.randrange(2, 1024) for _ in range(n)] for n in (3, 40, 17, 90, 8, 25)]


@pytest.fixture(scope="module")
def expected(tiny_dir, prompts):
    return [o.token_ids for o in LLM(model=str(tiny_dir)).generate(prompts, PARAMS)]


def start_streams(router, prompts):
    """Start every request and wait until each has streamed its first tokens."""
    gens = [router.generate.options(num_returns="streaming").remote(p, PARAMS) for p in prompts]
    firsts = [ray.get(next(g), timeout=TIMEOUT) for g in gens]
    assert not any(f.finished for f in firsts)
    return gens, firsts


def finish_streams(gens, firsts) -> list[list[int]]:
    """Every stream to its end: the tokens its deltas carry, checked against the final output."""
    results = []
    for gen, first in zip(gens, firsts):
        tokens, last = list(first.delta_token_ids), first
        for ref in gen:
            last = ray.get(ref, timeout=TIMEOUT)
            tokens += last.delta_token_ids
        assert last.finished and last.finish_reason == "length"
        assert tokens == last.token_ids, "a token was repeated or lost in the stream"
        results.append(tokens)
    return results


def wait_idle(router, timeout=60):
    deadline = time.time() + timeout
    while True:
        cache = ray.get(router.cache_stats.remote(), timeout=30)
        if cache["num_free_blocks"] == cache["num_blocks"] and cache["num_running"] == cache["num_waiting"] == 0:
            return cache
        if time.time() > deadline:
            raise AssertionError(f"cache not idle after {timeout} s: {cache}")
        time.sleep(0.2)


def shards(router, kind):
    return ray.get(router.shards.remote(), timeout=30)[kind]


def recoveries(router) -> int:
    return ray.get(router.counters.remote(), timeout=30)["num_recoveries"]


def run_with_fault(router, prompts, expected, fault):
    before = recoveries(router)
    gens, firsts = start_streams(router, prompts)
    fault()
    assert finish_streams(gens, firsts) == expected
    wait_idle(router)
    counters = ray.get(router.counters.remote(), timeout=30)
    assert counters["num_recoveries"] == before + 1, counters["faults"]
    assert counters["error"] is None
    return counters


def test_no_fault_baseline(router, prompts, expected):
    gens, firsts = start_streams(router, prompts)
    assert finish_streams(gens, firsts) == expected
    wait_idle(router)
    assert recoveries(router) == 0


def test_expert_shard_killed_by_ray_kill(router, prompts, expected):
    victim, info = shards(router, "expert")[1]
    counters = run_with_fault(router, prompts, expected, lambda: ray.kill(victim))
    assert "expert shard 1 died" in counters["faults"][-1]["fault"]
    assert shards(router, "expert")[1][1]["pid"] != info["pid"]  # a replacement, with its weights reloaded


def test_expert_shard_killed_by_signal(router, prompts, expected):
    _, info = shards(router, "expert")[0]
    run_with_fault(router, prompts, expected, lambda: os.kill(info["pid"], signal.SIGKILL))
    assert shards(router, "expert")[0][1]["pid"] != info["pid"]


def test_hung_expert_shard_is_replaced(router, prompts, expected):
    """A shard that stops answering (SIGSTOP) is a stuck step: detected by the step timeout, then replaced."""
    _, info = shards(router, "expert")[1]
    try:
        counters = run_with_fault(router, prompts, expected, lambda: os.kill(info["pid"], signal.SIGSTOP))
        assert "expert shard 1 hung" in counters["faults"][-1]["fault"]
    finally:
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_attention_shard_killed(router, prompts, expected):
    """Its requests move to the other attention shard (or its replacement) and their streams go on."""
    victim, info = shards(router, "attention")[0]
    counters = run_with_fault(router, prompts, expected, lambda: os.kill(info["pid"], signal.SIGKILL))
    assert "attention shard 0 died" in counters["faults"][-1]["fault"]
    assert counters["attention_shards_alive"] == 2  # replaced: its node still has room
