"""The disaggregated cluster on a DeepSeek-V3-architecture checkpoint in DeepSeek's FP8, on a real multi-node Ray
cluster on this machine: the single process's greedy tokens, and the devices each token reaches, measured by the
attention shards' dispatchers, within topk_group (or not bounded at all over one group).
"""

from __future__ import annotations

import random

import pytest

from latentmoe import LLM, SamplingParams
from latentmoe.model.tiny import TINY_V3_CONFIG, make_tiny
from tests.actors.clusters import role_cluster

TIMEOUT = 120
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
ONE_GROUP = dict(TINY_V3_CONFIG, n_group=1, topk_group=1)  # as Kimi-K2 and Moonlight route


@pytest.fixture(scope="module")
def cluster():
    with role_cluster(expert_nodes=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    return {"groups": make_tiny(root / "groups", seed=5, config=TINY_V3_CONFIG, fp8_block_size=(128, 128)),
            "one_group": make_tiny(root / "one", seed=5, config=ONE_GROUP, fp8_block_size=(128, 128))}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [[rng.randrange(2, 1024) for _ in range(n)] for n in (1, 150, 9, 40, 3, 77)]


def reached(stats) -> int:
    histogram = stats["devices_histogram"]
    return max(n for n, count in enumerate(histogram) if count)


@pytest.mark.parametrize("arch,num_attention,num_expert", [("groups", 1, 2), ("groups", 2, 4), ("one_group", 1, 4)])
def test_v3_cluster_equals_single_process(cluster, checkpoints, prompts, arch, num_attention, num_expert):
    path = str(checkpoints[arch])
    expected = [o.token_ids for o in LLM(model=path).generate(prompts, GREEDY)]
    llm = LLM(model=path, attention_shards=num_attention, expert_shards=num_expert, block_size=16, num_blocks=64,
              timeout_s=TIMEOUT)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
        stats = llm.dispatch_stats()
        histogram = stats["devices_histogram"]
        assert histogram[0] == 0 and sum(histogram) > 0
        assert sum(stats["tokens_per_shard"]) == sum(n * c for n, c in enumerate(histogram))
        print(f"{arch}, {num_attention} attention + {num_expert} expert shards: devices per token histogram "
              f"{histogram}, bound {stats['max_devices_per_token']}")
        if arch == "groups":  # 4 groups of 4 placed whole; each token keeps topk_group = 2 of them
            assert stats["max_devices_per_token"] == min(num_expert, TINY_V3_CONFIG["topk_group"])
            assert reached(stats) == min(num_expert, TINY_V3_CONFIG["topk_group"])  # the bound, and it is reached
        else:  # one group: nothing bounds it, and tokens do go past topk_group's 2
            assert stats["max_devices_per_token"] is None
            assert reached(stats) > 2
    finally:
        llm.shutdown()
