"""Expert placement for DeepSeek-V3's routing: groups whole on shards bound the devices per token by topk_group;
one group (Kimi-K2, Moonlight) bounds nothing, and the placement says so."""

from __future__ import annotations

import pytest

from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.model.config import ModelConfig
from latentmoe.model.tiny import TINY_V3_CONFIG, published_config


@pytest.mark.parametrize("num_shards,limit", [(1, 1), (2, 2), (4, 2), (8, 4)])
def test_v3_groups_are_placed_whole(num_shards, limit):
    cfg = ModelConfig.from_dict(TINY_V3_CONFIG)  # 4 groups of 4, topk_group 2
    placement = ExpertPlacement.build(cfg, num_shards)
    assert placement.max_devices_per_token == limit
    assert f"at most {limit} of {num_shards} expert shards" in placement.device_limit
    for g in range(cfg.n_group):
        shards = {placement.shard_of_expert[e] for e in range(4 * g, 4 * g + 4)}
        assert len(shards) == (1 if num_shards <= cfg.n_group else num_shards // cfg.n_group)


@pytest.mark.parametrize("name", ["kimi-k2", "moonlight"])
def test_one_group_means_no_device_limit(name):
    cfg = ModelConfig.from_dict(published_config(name))
    placement = ExpertPlacement.build(cfg, 8)
    assert placement.max_devices_per_token is None
    assert placement.device_limit == ("no device limit: noaux_tc over one group (n_group=1) limits nothing, so a "
                                      "token may reach all 8 expert shards")


def test_published_v3_placements():
    v3 = ModelConfig.from_dict(published_config("deepseek-v3"))  # 8 groups, top-4
    assert [ExpertPlacement.build(v3, e).max_devices_per_token for e in (8, 16, 32, 64)] == [4, 8, 16, 32]
    greedy = ModelConfig.from_dict(published_config("deepseek-v2-lite"))
    assert "greedy routing" in ExpertPlacement.build(greedy, 4).device_limit
