"""The disaggregated cluster on a real multi-node Ray cluster on this machine, against the single-process engine.

One Ray cluster for the module: a head, an attention node and two expert nodes, each advertising its role.
"""

from __future__ import annotations

import copy
import random

import pytest
import ray

from latentmoe import LLM, SamplingParams
from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, shard_bundles
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


def stream(router, prompt, params):
    return router.generate.options(num_returns="streaming").remote(prompt, params)


def collect(gen, refs=()) -> list[int]:
    tokens, last = [], None
    for ref in [*refs, *gen]:
        last = ray.get(ref, timeout=TIMEOUT)
        tokens += last.delta_token_ids
    assert last is not None and last.finished
    assert tokens == last.token_ids
    return tokens


@pytest.mark.parametrize("num_attention,num_expert", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4)])
def test_cluster_equals_single_process(cluster, tiny_dir, prompts, expected, num_attention, num_expert):
    llm = LLM(model=str(tiny_dir), attention_shards=num_attention, expert_shards=num_expert, block_size=16,
              num_blocks=64, timeout_s=TIMEOUT)
    try:
        info = llm.shard_info
        assert info["placement_warning"] is None
        # the actors really are on the nodes of their role
        assert {s["node_id"] for s in info["attention"]} <= cluster["attention"]
        assert {s["node_id"] for s in info["expert"]} <= cluster["expert"]
        assert len(info["attention"]) == num_attention and len(info["expert"]) == num_expert

        # half the requests first; the rest arrive once the first is decoding
        router = llm.router
        first = [stream(router, p, GREEDY) for p in prompts[:4]]
        head = next(first[0])
        assert not ray.get(head, timeout=TIMEOUT).finished
        rest = [stream(router, p, GREEDY) for p in prompts[4:]]
        outputs = [collect(first[0], [head])] + [collect(g) for g in first[1:] + rest]
        assert outputs == expected

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
        assert stats["a2a_bytes"] == stats["ideal_bytes"] == rows * (2 * D * 4 + 2 * K * 4) > 0

        cache = llm.cache_stats()
        assert cache["num_free_blocks"] == cache["num_blocks"] == 64 * num_attention
    finally:
        llm.shutdown()


def make_layers(tmp_path_factory, num_layers: int):
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["num_hidden_layers"] = num_layers
    return make_tiny(tmp_path_factory.mktemp(f"layers{num_layers}"), seed=3, config=cfg)


def test_ray_calls_per_step_do_not_grow_with_layers(cluster, tmp_path_factory):
    per_step = {}
    for layers in (2, 6):
        llm = LLM(model=str(make_layers(tmp_path_factory, layers)), attention_shards=1, expert_shards=2,
                  num_blocks=16, timeout_s=TIMEOUT)
        try:
            llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
            counters = ray.get(llm.router.counters.remote(), timeout=TIMEOUT)
            received = ray.get(llm.router.shard_calls.remote(), timeout=TIMEOUT)
            assert counters["num_steps"] == 10  # one prefill step, then nine decode steps
            assert sum(received) == counters["num_step_calls"]  # what the shards counted, not what we think we sent
            per_step[layers] = counters["num_step_calls"] / counters["num_steps"]
        finally:
            llm.shutdown()
    assert per_step[2] == per_step[6] == 3  # one call per shard per step


def test_placement_needs_and_fallback(cluster, tiny_dir):
    bundles, warning = shard_bundles(2, 3, gpu=False, cluster_resources={"CPU": 8})
    assert warning is not None and ATTENTION_RESOURCE in warning and len(bundles) == 5
    assert all(set(b) == {"CPU"} for b in bundles)
    bundles, warning = shard_bundles(1, 2, gpu=True, cluster_resources={ATTENTION_RESOURCE: 1, EXPERT_RESOURCE: 4})
    assert warning is None and bundles[0] == {"CPU": 1.0, "GPU": 1.0, ATTENTION_RESOURCE: 1.0}
    # more shards than the cluster can hold: a clear error after the timeout, never a hang
    with pytest.raises(RuntimeError, match="could not place 5 attention \\+ 4 expert shards"):
        LLM(model=str(tiny_dir), attention_shards=5, expert_shards=4, timeout_s=5)
