"""Shard faults on a real multi-node Ray cluster on this machine, with streaming requests in flight.

One cluster for the module: a head, an attention node (two attention shards) and an expert node (two
expert shards). Each test starts several streaming requests, injects a fault once they are decoding,
and checks that every request ends with exactly the greedy tokens of a run without the fault (the
single-process engine), with no token repeated or missing in its stream, and that the latent cache
returns to idle.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import ray

from latentmoe import LLM, SamplingParams
from tests.actors.clusters import role_cluster

TIMEOUT = 120
PARAMS = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with role_cluster(expert_nodes=1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def llm(cluster, tiny_dir):
    engine = LLM(model=str(tiny_dir), attention_shards=2, expert_shards=2, block_size=16, num_blocks=96,
                 timeout_s=TIMEOUT, step_timeout_s=8.0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [[rng.randrange(2, 1024) for _ in range(n)] for n in (3, 40, 17, 90, 8, 25)]


@pytest.fixture(scope="module")
def expected(tiny_dir, prompts):
    return [o.token_ids for o in LLM(model=str(tiny_dir)).generate(prompts, PARAMS)]


def streams_with_fault(llm, prompts, fault) -> list[list[int]]:
    """Start every request, wait until each has streamed its first tokens, inject ``fault``, then follow every
    stream to its end: the tokens its deltas carry, checked against its final output."""

    async def run():
        streams = [llm.router.generate(p, PARAMS) for p in prompts]
        firsts = [await asyncio.wait_for(s.__anext__(), TIMEOUT) for s in streams]
        assert not any(f.finished for f in firsts)
        await asyncio.to_thread(fault)

        async def finish(stream, first):
            tokens, last = list(first.delta_token_ids), first
            async for last in stream:
                tokens += last.delta_token_ids
            assert last.finished and last.finish_reason == "length"
            assert tokens == last.token_ids, "a token was repeated or lost in the stream"
            return tokens

        return await asyncio.wait_for(asyncio.gather(*(finish(s, f) for s, f in zip(streams, firsts))), 4 * TIMEOUT)

    return asyncio.run(run())


def wait_idle(llm, timeout=60):
    deadline = time.time() + timeout
    while True:
        cache = llm.cache_stats()
        if cache["num_free_blocks"] == cache["num_blocks"] and cache["num_running"] == cache["num_waiting"] == 0:
            return cache
        if time.time() > deadline:
            raise AssertionError(f"cache not idle after {timeout} s: {cache}")
        time.sleep(0.2)


def status(llm) -> dict:
    return ray.get(llm.coordinator.status.remote(), timeout=30)


def shards(llm, kind):
    return ray.get(llm.coordinator.shards.remote(), timeout=30)[kind]


def wait_members(llm, num_attention: int, timeout=TIMEOUT) -> dict:
    deadline = time.time() + timeout
    while True:
        st = status(llm)
        if st["attention_shards"] == num_attention and st["expert_shards"] == 2:
            return st
        if time.time() > deadline:
            raise AssertionError(f"the group did not settle: {st}")
        time.sleep(0.5)


def run_with_fault(llm, prompts, expected, fault):
    before = status(llm)["num_recoveries"]
    assert streams_with_fault(llm, prompts, fault) == expected
    wait_idle(llm)
    st = wait_members(llm, 2)
    assert st["num_recoveries"] >= before + 1, st["faults"]
    assert st["error"] is None
    return st


def test_no_fault_baseline(llm, prompts, expected):
    before = status(llm)["num_recoveries"]
    assert streams_with_fault(llm, prompts, lambda: None) == expected
    wait_idle(llm)
    assert status(llm)["num_recoveries"] == before


def test_expert_shard_killed_by_ray_kill(llm, prompts, expected):
    victim, info = shards(llm, "expert")[1]
    st = run_with_fault(llm, prompts, expected, lambda: ray.kill(victim))
    assert info["member"].id in st["faults"][-1]["fault"], st["faults"]
    assert shards(llm, "expert")[1][1]["pid"] != info["pid"]  # a replacement, with its weights reloaded


def test_expert_shard_killed_by_signal(llm, prompts, expected):
    _, info = shards(llm, "expert")[0]
    run_with_fault(llm, prompts, expected, lambda: os.kill(info["pid"], signal.SIGKILL))
    assert shards(llm, "expert")[0][1]["pid"] != info["pid"]


def test_hung_expert_shard_is_replaced(llm, prompts, expected):
    """A shard that stops answering (SIGSTOP): the others' collectives time out, the coordinator's probe finds
    it silent, and it is replaced."""
    _, info = shards(llm, "expert")[1]
    try:
        st = run_with_fault(llm, prompts, expected, lambda: os.kill(info["pid"], signal.SIGSTOP))
        assert info["member"].id in st["faults"][-1]["fault"], st["faults"]
    finally:
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_attention_shard_killed(llm, prompts, expected):
    """Its requests move to the other attention shard (or its replacement) and their streams go on."""
    _, info = shards(llm, "attention")[0]
    run_with_fault(llm, prompts, expected, lambda: os.kill(info["pid"], signal.SIGKILL))
    assert info["pid"] not in [i["pid"] for _, i in shards(llm, "attention")]


def test_coordinator_killed(llm, prompts, expected):
    """SIGKILL the coordinator with streams in flight: the streams finish with the same greedy tokens (the
    coordinator is on no token's path), Ray restarts it, it takes over the running group, new requests run."""
    before = status(llm)
    pid = ray.get(llm.coordinator.__ray_call__.remote(lambda self: os.getpid()), timeout=30)

    def kill():
        os.kill(pid, signal.SIGKILL)

    assert streams_with_fault(llm, prompts, kill) == expected
    after = wait_members(llm, 2)
    assert after["restarted"] and after["epoch"] == before["epoch"], (before, after)
    assert [o.token_ids for o in llm.generate(prompts[:2], PARAMS)] == expected[:2]
    wait_idle(llm)


def test_coordinator_killed_after_an_expert_shard_change(llm, prompts, expected):
    """2 -> 1 expert shards, then SIGKILL the coordinator with streams in flight: its successor (made with the
    arguments of the first, 2 expert shards) takes over the one expert shard running and starts none; then back to
    2, and every reply is the single process's."""
    assert llm.scale_experts(1)["changed"]
    before = status(llm)
    assert before["expert_shards"] == 1
    pid = ray.get(llm.coordinator.__ray_call__.remote(lambda self: os.getpid()), timeout=30)

    def kill():
        os.kill(pid, signal.SIGKILL)

    assert streams_with_fault(llm, prompts, kill) == expected
    deadline = time.time() + TIMEOUT
    while True:  # the successor answers once it has adopted the group
        try:
            if ray.get(llm.coordinator.__ray_call__.remote(lambda self: os.getpid()), timeout=30) != pid:
                break
        except ray.exceptions.RayError:
            pass
        assert time.time() < deadline, "the coordinator was not restarted"
        time.sleep(0.5)
    after = status(llm)
    assert after["expert_shards"] == 1 and after["epoch"] == before["epoch"] and after["error"] is None, after
    assert len(shards(llm, "expert")) == 1
    assert [o.token_ids for o in llm.generate(prompts[:2], PARAMS)] == expected[:2]
    assert llm.scale_experts(2)["changed"]
    wait_members(llm, 2)
    assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == expected
    wait_idle(llm)
