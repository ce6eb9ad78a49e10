"""Dispatch planning, placement, and the exchange of one MoE layer over gloo between real processes, without Ray."""

from __future__ import annotations

import copy

import pytest
import torch

from latentmoe.cluster.communicator import GlooCommunicator, Traffic
from latentmoe.cluster.dispatch import AttentionDispatcher, expert_exchange, plan_dispatch
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.model.config import ModelConfig
from latentmoe.model.tiny import TINY_CONFIG
from tests.cluster.test_communicator import run_ranks


def test_each_token_goes_once_to_each_device_it_needs():
    cfg = ModelConfig.from_dict(TINY_CONFIG)  # 16 experts, 4 groups of 4, top-2 groups
    placement = ExpertPlacement.build(cfg, 2)
    shard_of, slot_of = placement.tensors()
    topk_ids = torch.tensor([[0, 1, 8, 9], [4, 5, 6, 7], [15, 14, 13, 12]])  # shards {0,1}, {0}, {1}
    weights = torch.rand(3, 4) + 0.1
    plan = plan_dispatch(topk_ids, weights, shard_of, slot_of, 2)
    assert plan.send_counts == [2, 2] and plan.devices_per_token.tolist() == [2, 1, 1]
    assert plan.token_index.tolist() == [0, 1, 0, 2]
    # on shard 0, token 0 computes experts 0 and 1 (slots 0, 1); 8 and 9 live on shard 1
    assert plan.slot_ids[0].tolist() == [0, 1, -1, -1]
    assert plan.slot_ids[2].tolist() == [-1, -1, 0, 1]  # experts 8, 9 are slots 0, 1 of shard 1
    assert torch.equal(plan.weights[0], weights[0])


@pytest.mark.parametrize("num_shards,limit", [(1, 2), (2, 2), (4, 2), (8, 4)])
def test_groups_are_placed_whole(num_shards, limit):
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    placement = ExpertPlacement.build(cfg, num_shards)
    assert placement.max_devices_per_token == min(limit, num_shards)
    if num_shards <= cfg.n_group:
        for g in range(cfg.n_group):
            group = range(g * cfg.experts_per_group, (g + 1) * cfg.experts_per_group)
            assert len({placement.shard_of_expert[e] for e in group}) == 1
    assert sorted(e for s in range(num_shards) for e in placement.experts_on(s)) == list(range(16))


def test_placement_rejects_what_cannot_hold_groups_whole():
    cfg = ModelConfig.from_dict(TINY_CONFIG)
    with pytest.raises(ValueError, match="cannot hold 4 expert groups whole"):
        ExpertPlacement.build(cfg, 3)
    greedy = copy.deepcopy(TINY_CONFIG) | dict(topk_method="greedy", n_group=None, topk_group=None)
    assert ExpertPlacement.build(ModelConfig.from_dict(greedy), 3).max_devices_per_token is None
    with pytest.raises(ValueError, match="expert shards must be in"):
        ExpertPlacement.build(cfg, 17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_and_metadata_travel_packed(dtype):
    from latentmoe.cluster.dispatch import pack_rows, unpack_rows

    hidden = torch.randn(5, 6).to(dtype)
    meta = torch.cat([torch.tensor([[0, -1, 3]] * 5).float(), torch.rand(5, 3)], dim=1)
    back_hidden, back_meta = unpack_rows(pack_rows(hidden, meta), 6, dtype)
    assert torch.equal(back_hidden, hidden) and torch.equal(back_meta, meta)
    assert torch.equal(unpack_rows(pack_rows(hidden[:0], meta[:0]), 6, dtype)[0], hidden[:0])


# --- the traffic the communicator counted, against the ideal worked out here from the routing -------------------

ATTENTION, EXPERT = [0, 1], [2, 3]  # ranks; expert shard s is rank EXPERT[s]
LAYERS = [1, 2]
TOKENS = {(0, 1): 7, (0, 2): 0, (1, 1): 5, (1, 2): 11}  # (rank, layer) -> tokens; one layer with none
D, K, E = TINY_CONFIG["hidden_size"], TINY_CONFIG["num_experts_per_tok"], TINY_CONFIG["n_routed_experts"]


def routing(rank: int, layer: int, dtype: torch.dtype):
    """Hidden states, top-k ids (K distinct experts, any groups) and weights of one attention rank in one layer."""
    gen = torch.Generator().manual_seed(100 * rank + layer)
    T = TOKENS[rank, layer]
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    if T:
        ids[0] = torch.arange(K)  # experts 0..K-1 all live on shard 0: this token reaches one shard only
    return torch.randn(T, D, generator=gen).to(dtype), ids, torch.rand(T, K, generator=gen) + 0.1


class TaggedExperts:
    """Stands in for ``RoutedExperts``: expert e scales its rows by e + 1, so a misrouted row shows."""

    w13 = w2 = None

    def __init__(self, expert_ids: list[int]):
        self.expert_ids = torch.tensor(expert_ids)

    def moe_impl(self, hidden, w13, w2, slot_ids, weights):
        tag = torch.where(slot_ids >= 0, self.expert_ids[slot_ids.clamp(min=0)] + 1, 0)  # [M, K]
        return (hidden.float() * (tag * weights).sum(1, keepdim=True)).to(hidden.dtype)


def _exchange_worker(rank, world, address, results, dtype):
    placement = ExpertPlacement.build(ModelConfig.from_dict(TINY_CONFIG), len(EXPERT))
    comm = GlooCommunicator(rank, world, address, timeout_s=120)  # generous: 4 processes on 2 busy cores
    if rank in ATTENTION:
        dispatcher = AttentionDispatcher(comm, placement, EXPERT, max_k=K, num_experts=E)
        errors = []
        for layer in LAYERS:
            h, ids, weights = routing(rank, layer, dtype)
            routed = dispatcher.routed(layer, h, ids, weights)
            expected = h.float() * (weights * (ids + 1)).sum(1, keepdim=True)
            errors.append(float((routed.float() - expected).abs().max() / expected.abs().max()) if len(h) else 0.0)
        results[rank] = dict(traffic=comm.traffic, stats=dispatcher.stats.as_dict(), errors=errors)
    else:
        experts = TaggedExperts(placement.experts_on(EXPERT.index(rank)))
        rows = [expert_exchange(comm, experts, D, K, dtype, attention_ranks=ATTENTION)[0] for _ in LAYERS]
        results[rank] = dict(traffic=comm.traffic, rows=rows)
    comm.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_counted_by_the_communicator_is_the_ideal(dtype):
    """Each token goes once to each expert shard holding one of its experts, with its K slots and weights, and
    comes back once as a partial sum: the bytes each rank's communicator counted are exactly that."""
    world = len(ATTENTION) + len(EXPERT)
    results = run_ranks(_exchange_worker, world, dtype)

    # the ideal, from the top-k ids and the placement only
    shard_of_expert = ExpertPlacement.build(ModelConfig.from_dict(TINY_CONFIG), len(EXPERT)).shard_of_expert
    there = D * dtype.itemsize + 2 * K * 4  # hidden state, then K slot ids and K weights as float32
    back = D * dtype.itemsize
    rows = {(a, s): 0 for a in ATTENTION for s in range(len(EXPERT))}  # (token, shard) pairs over the layers
    for a in ATTENTION:
        for layer in LAYERS:
            for token in routing(a, layer, dtype)[1].tolist():
                for s in {shard_of_expert[e] for e in token}:
                    rows[a, s] += 1
    counts = 8 * len(LAYERS)  # the split sizes: one int64 from each attention rank to each expert rank per layer

    for a in ATTENTION:
        expected = Traffic.zero(world)  # nothing to or from the other attention rank
        for s, r in enumerate(EXPERT):
            expected.sent[r] = counts
            expected.sent[r] += rows[a, s] * there
            expected.received[r] += rows[a, s] * back
        got = results[a]
        assert got["traffic"] == expected, a
        ideal = sum(rows[a, s] for s in range(len(EXPERT))) * (there + back)
        assert got["stats"]["a2a_bytes"] == got["stats"]["ideal_bytes"] == ideal > 0
        assert got["stats"]["a2a_counts_bytes"] == counts * len(EXPERT)
        assert max(got["errors"]) < (1e-6 if dtype == torch.float32 else 1e-2), got["errors"]  # relative
    for s, r in enumerate(EXPERT):
        assert sum(results[r]["rows"]) == sum(rows[a, s] for a in ATTENTION)
        expected = Traffic.zero(world)  # nothing to or from the other expert rank
        for a in ATTENTION:
            expected.received[a] = counts
            expected.received[a] += rows[a, s] * there
            expected.sent[a] += rows[a, s] * back
        assert results[r]["traffic"] == expected, r


# --- two exchanges per MoE layer: the later layers' rows padded, their count inside ------------------------------

PASS_TOKENS = {0: 7, 1: 11}  # attention rank -> tokens of its pass (the same in every layer of a pass)
PADDED_MAX = 8  # rank 0's pass is padded after the first layer; rank 1's (11 tokens) keeps asking with counts
PASS_LAYERS = [1, 2, 3]


def pass_routing(rank: int, layer: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(100 * rank + layer)
    T = PASS_TOKENS[rank]
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if layer == 2:
        ids[:] = torch.arange(K)  # every token on shard 0 only: shard 1 gets a block with a count of 0
    return torch.randn(T, D, generator=gen).to(dtype), ids, torch.rand(T, K, generator=gen) + 0.1


def _padded_worker(rank, world, address, results, dtype):
    placement = ExpertPlacement.build(ModelConfig.from_dict(TINY_CONFIG), len(EXPERT))
    comm = GlooCommunicator(rank, world, address, timeout_s=120)
    if rank in ATTENTION:
        dispatcher = AttentionDispatcher(comm, placement, EXPERT, max_k=K, num_experts=E,
                                         padded_max_tokens=PADDED_MAX, first_layer=PASS_LAYERS[0])
        errors = []
        for layer in PASS_LAYERS:
            h, ids, weights = pass_routing(rank, layer, dtype)
            routed = dispatcher.routed(layer, h, ids, weights)
            expected = h.float() * (weights * (ids + 1)).sum(1, keepdim=True)
            errors.append(float((routed.float() - expected).abs().max() / expected.abs().max()))
        results[rank] = dict(traffic=comm.traffic, stats=dispatcher.stats.as_dict(), errors=errors)
    else:
        experts = TaggedExperts(placement.experts_on(EXPERT.index(rank)))
        rows, tokens = [], None
        for _ in PASS_LAYERS:
            n, _, tokens = expert_exchange(comm, experts, D, K, dtype, attention_ranks=ATTENTION,
                                           padded_max_tokens=PADDED_MAX, pass_tokens=tokens)
            rows.append(n)
        results[rank] = dict(traffic=comm.traffic, rows=rows, pass_tokens=tokens)
    comm.close()


def test_padded_rows_after_the_first_layer_carry_their_count():
    """Rank 0 (7 tokens) sends its later layers' rows as blocks of 8 rows per expert shard, count in the header,
    and no counts; rank 1 (11 tokens, over the bound) sends counts every layer. Every partial sum comes back to
    its token; the bytes counted are the blocks, padding and all."""
    dtype = torch.float32
    world = len(ATTENTION) + len(EXPERT)
    results = run_ranks(_padded_worker, world, dtype)
    shard_of_expert = ExpertPlacement.build(ModelConfig.from_dict(TINY_CONFIG), len(EXPERT)).shard_of_expert
    there, back, counts = D * 4 + 2 * K * 4, D * 4, 2 * 8  # a count and the pass's tokens: two int64
    rows = {(a, layer, s): 0 for a in ATTENTION for layer in PASS_LAYERS for s in range(len(EXPERT))}
    for a in ATTENTION:
        for layer in PASS_LAYERS:
            for token in pass_routing(a, layer, dtype)[1].tolist():
                for s in {shard_of_expert[e] for e in token}:
                    rows[a, layer, s] += 1
    assert rows[0, 2, 1] == 0  # the block with a count of 0
    for a in ATTENTION:
        expected = Traffic.zero(world)
        for layer in PASS_LAYERS:
            padded = layer != PASS_LAYERS[0] and PASS_TOKENS[a] <= PADDED_MAX
            for s, r in enumerate(EXPERT):
                if padded:
                    expected.sent[r] += (PASS_TOKENS[a] + 1) * there
                else:
                    expected.sent[r] += counts + rows[a, layer, s] * there
                expected.received[r] += rows[a, layer, s] * back
        got = results[a]
        assert got["traffic"] == expected, a
        assert max(got["errors"]) < 1e-6, got["errors"]
        stats = got["stats"]  # the padding is accounted for: what moved is the ideal plus the blocks' slack
        assert stats["a2a_bytes"] == stats["ideal_bytes"] + stats["a2a_padding_bytes"]
        assert (stats["a2a_padding_bytes"] > 0) == (PASS_TOKENS[a] <= PADDED_MAX)
    for s, r in enumerate(EXPERT):
        assert results[r]["pass_tokens"] == PASS_TOKENS
        assert results[r]["rows"] == [sum(rows[a, layer, s] for a in ATTENTION) for layer in PASS_LAYERS]
