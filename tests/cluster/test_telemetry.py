"""Expert-load counters across a change of the number of expert shards: per-shard lists grow with it and keep
the counts of shards that went; the window's summary shows the shards in force."""

from __future__ import annotations

from latentmoe.cluster.dispatch import DispatchStats
from latentmoe.cluster.telemetry import ExpertLoadWindow, plus


def snapshot(per_shard: list[int], pairs: list[int], experts: list[int]) -> dict:
    return {"tokens_per_expert": {"1": experts}, "tokens_per_shard": per_shard, "pairs_per_shard": pairs,
            "devices_histogram": [0, sum(per_shard), 0], "a2a_bytes": 10 * sum(per_shard), "a2a_counts_bytes": 0,
            "ideal_bytes": 8 * sum(per_shard)}


def test_counts_of_different_lengths_add_up_padded():
    assert plus([1, 2], [10, 20, 30, 40]) == [11, 22, 30, 40] == plus([10, 20, 30, 40], [1, 2])
    two = DispatchStats.from_dict(snapshot([3, 5], [6, 10], [4, 4, 4, 4]), 4, 2, 2)
    four = DispatchStats.from_dict(snapshot([1, 1, 2, 2], [2, 2, 4, 4], [3, 3, 3, 3]), 4, 4, 2)
    two.merge(four)
    assert two.tokens_per_shard == [4, 6, 2, 2] and two.pairs_per_shard == [8, 12, 4, 4]
    assert two.tokens_per_expert == {1: [7, 7, 7, 7]}


def test_the_window_follows_the_number_of_expert_shards():
    window = ExpertLoadWindow(num_experts=4, num_shards=2, max_k=2)
    window.update(0, snapshot([10, 10], [20, 20], [10, 10, 10, 10]), now=100.0)
    # the shard's counters after 2 -> 4 expert shards: the old two went on, two new ones began
    delta = window.update(0, snapshot([14, 12, 6, 2], [28, 24, 12, 4], [14, 14, 8, 8]), now=101.0)
    assert delta.tokens_per_shard == [4, 2, 6, 2] and delta.pairs_per_shard == [8, 4, 12, 4]
    window.num_shards = 4
    recent = window.summary(0.5, now=101.0)
    assert recent["tokens_per_shard"] == [4, 2, 6, 2] and recent["num_shards"] == 4
    assert recent["shard_work_imbalance"] == round(12 * 4 / 28, 4)
    # 4 -> 1: the counts of the shards that went stay in the snapshots but leave the summary
    window.update(0, snapshot([24, 12, 6, 2], [48, 24, 12, 4], [24, 24, 18, 18]), now=102.0)
    window.num_shards = 1
    recent = window.summary(0.5, now=102.0)
    assert recent["tokens_per_shard"] == [10] and recent["pairs_per_shard"] == [20]
    assert recent["shard_imbalance"] == 1.0
    everything = window.summary(10.0, now=102.0)
    assert everything["tokens_per_shard"] == [24] and everything["num_tokens"] == 44
