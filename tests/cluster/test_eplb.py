"""EPLB: replicated placements, the copy each token uses, and the rebalancer, checked against plan_dispatch and
against counts made here row by row from the plans and the slot tables."""

from __future__ import annotations

import pytest
import torch

from latentmoe.cluster.dispatch import plan_dispatch
from latentmoe.cluster.eplb import (ReplicatedPlacement, assign_copies, balanced_packing, imbalance,
                                    plan_dispatch_replicated, rebalance, shard_load, slot_changes)
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.model.config import ModelConfig
from latentmoe.model.deepseek_v2 import Gate
from latentmoe.model.tiny import TINY_CONFIG, TINY_V3_CONFIG, published_config

TINY = ModelConfig.from_dict(TINY_CONFIG)  # 16 experts, 4 groups of 4, top-2 groups, top-4 experts
TINY_V3 = ModelConfig.from_dict(TINY_V3_CONFIG)  # the same routing shape, noaux_tc
GREEDY = ModelConfig.from_dict(TINY_CONFIG | dict(topk_method="greedy", n_group=None, topk_group=None))
V2 = ModelConfig.from_dict(published_config("deepseek-v2"))  # 160 experts, 8 groups, top-3 groups, top-6
V3 = ModelConfig.from_dict(published_config("deepseek-v3"))  # 256 experts, 8 groups, top-4 groups, top-8
MOONLIGHT = ModelConfig.from_dict(published_config("moonlight"))  # 64 experts, one group


def gate_routing(cfg: ModelConfig, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, K]``, ``topk_weights [T, K]`` from the model's own gate with random weights."""
    torch.manual_seed(seed)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    weights, ids = gate(torch.randn(num_tokens, cfg.hidden_size))
    return ids, weights


def skewed_routing(cfg: ModelConfig, num_tokens: int, seed: int, hot: dict[int, float]) -> torch.Tensor:
    """Group-limited routing as the gate does it (``topk_group`` groups by their best score, then the top k inside
    them), with the experts in ``hot`` (expert -> score boost) chosen far more often. ``[T, K]``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, cfg.n_routed_experts, generator=g)  # [T, E]
    for e, boost in hot.items():
        scores[:, e] += boost
    if cfg.group_limited:
        grouped = scores.view(num_tokens, cfg.n_group, -1)  # [T, G, E/G]
        keep = grouped.amax(-1).topk(cfg.topk_group, -1).indices  # [T, M]
        mask = torch.zeros(num_tokens, cfg.n_group, dtype=torch.bool).scatter_(1, keep, True)
        scores = grouped.masked_fill(~mask[..., None], float("-inf")).flatten(1)
    return scores.topk(cfg.num_experts_per_tok, -1).indices


def hot_in_first_groups(cfg: ModelConfig) -> dict[int, float]:
    """Hot experts all in groups 0 and 1, which today's contiguous placement puts on the same shard."""
    per_group = cfg.experts_per_group if cfg.group_limited else 4
    return {0: 3.0, 1: 2.5, 2: 2.0, per_group: 2.5, per_group + 1: 1.5}


def load_of(cfg: ModelConfig, topk_ids: torch.Tensor) -> torch.Tensor:
    return torch.bincount(topk_ids.flatten(), minlength=cfg.n_routed_experts)[None].double()  # [1, E]


def rows_by_shard(plan) -> list[tuple[int, int, list[int]]]:
    """``(shard, token, slot ids)`` for every row of a plan, from its send counts (the rows grouped by shard)."""
    rows, m = [], 0
    for s, count in enumerate(plan.send_counts):
        for _ in range(count):
            rows.append((s, int(plan.token_index[m]), plan.slot_ids[m].tolist()))
            m += 1
    assert m == len(plan.token_index), (m, len(plan.token_index))
    return rows


# ---- no copies: today's plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,num_shards", [(TINY, 1), (TINY, 2), (TINY, 4), (TINY, 8), (TINY_V3, 2),
                                            (TINY_V3, 4), (GREEDY, 3), (GREEDY, 5)])
def test_without_copies_the_plan_is_plan_dispatch(cfg, num_shards):
    placement = ExpertPlacement.build(cfg, num_shards)
    replicated = ReplicatedPlacement.from_placement(placement, version=3)
    assert replicated.version == 3 and replicated.num_copies == 0
    assert replicated.max_devices_per_token == placement.max_devices_per_token
    assert ReplicatedPlacement.build(cfg, num_shards) == ReplicatedPlacement.from_placement(placement)
    topk_ids, topk_weights = gate_routing(cfg, 200, seed=num_shards)
    want = plan_dispatch(topk_ids, topk_weights, *placement.tensors(), num_shards)
    for load in (None, torch.arange(num_shards).double()):
        got = plan_dispatch_replicated(topk_ids, topk_weights, replicated, load)
        assert got.send_counts == want.send_counts
        for name in ("token_index", "slot_ids", "weights", "devices_per_token"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_uneven_shards_get_empty_slots():
    replicated = ReplicatedPlacement.from_placement(ExpertPlacement.build(GREEDY, 3))  # 16 experts: 6, 5, 5
    assert replicated.slots_per_shard == 6
    assert [row.count(-1) for row in replicated.physical] == [0, 1, 1]


# ---- copies: the right expert, on shards the token visits anyway -------------------------------------------------


def placements_with_copies():
    for cfg, num_shards, redundant in [(TINY, 2, 2), (TINY, 4, 1), (TINY, 8, 1), (TINY_V3, 4, 2), (V2, 4, 3),
                                       (V3, 8, 4), (GREEDY, 3, 2), (MOONLIGHT, 4, 2)]:
        topk_ids = skewed_routing(cfg, 400, seed=num_shards, hot=hot_in_first_groups(cfg))
        yield pytest.param(cfg, topk_ids, rebalance(cfg, load_of(cfg, topk_ids), num_shards, redundant, version=1),
                           id=f"rebalanced-{cfg.n_routed_experts}e-{num_shards}s-{redundant}r")
        yield pytest.param(cfg, topk_ids, ReplicatedPlacement.build(cfg, num_shards, redundant),
                           id=f"built-{cfg.n_routed_experts}e-{num_shards}s-{redundant}r")


@pytest.mark.parametrize("cfg,topk_ids,placement", placements_with_copies())
def test_copies_hold_the_expert_and_add_no_shard(cfg, topk_ids, placement):
    T, K = topk_ids.shape
    topk_weights = torch.rand(T, K)
    plan = plan_dispatch_replicated(topk_ids, topk_weights, placement)
    covered = [[0] * K for _ in range(T)]
    shards_of_token = [set() for _ in range(T)]
    used_copies = 0
    for s, t, slots in rows_by_shard(plan):
        assert s not in shards_of_token[t], f"token {t} sent twice to shard {s}"
        shards_of_token[t].add(s)
        assert any(slot >= 0 for slot in slots), f"token {t} sent to shard {s} with nothing to compute"
        for k, slot in enumerate(slots):
            if slot >= 0:
                e = int(topk_ids[t, k])
                assert placement.physical[s][slot] == e, f"token {t} k={k}: slot {slot} of shard {s} is not expert {e}"
                covered[t][k] += 1
                used_copies += s != placement.primary_shard[e]
    assert all(c == [1] * K for c in covered), "every (token, expert) computed exactly once"
    for t in range(T):
        primaries = {placement.primary_shard[int(e)] for e in topk_ids[t]}
        assert shards_of_token[t] <= primaries, f"token {t} reaches {shards_of_token[t]} beyond {primaries}"
    reached = torch.bincount(plan.token_index, minlength=T)  # rows per token, counted from the rows themselves
    assert torch.equal(reached, plan.devices_per_token)
    if cfg.group_limited and placement.max_devices_per_token is not None:
        assert int(reached.max()) <= placement.max_devices_per_token
        if cfg.n_group >= placement.num_shards:
            assert int(reached.max()) <= cfg.topk_group
    assert placement.num_copies > 0 and used_copies > 0, "copies exist and some tokens use them"


def test_the_choice_is_deterministic_and_follows_the_shares():
    # 4 experts on 2 shards: 0, 1 on shard 0 and 2, 3 on shard 1; a copy of 0 on shard 1 takes 3/4 of its tokens
    placement = ReplicatedPlacement(0, 2, 3, ((0, 1, 3), (2, 3, 0)), (0, 0, 1, 1),
                                    share=((0.25, 1.0, 0.5), (1.0, 0.5, 0.75)))
    visits_both = torch.tensor([[0, 2]] * 400)  # may use the copy of 0 on shard 1 (and of 3 on shard 0: not chosen)
    visits_one = torch.tensor([[0, 1]] * 400)  # only shard 0: always expert 0's primary
    topk_ids = torch.cat([visits_both, visits_one]).view(2, 400, 2).transpose(0, 1).reshape(800, 2)  # interleaved
    shard, slot = assign_copies(placement, topk_ids)
    assert torch.equal(shard[1::2], torch.zeros(400, 2, dtype=torch.long))
    # 3/4 of expert 0's 800 tokens is 600, but only 400 can reach shard 1: all of those go there
    assert shard[0::2, 0].tolist() == [1] * 400 and slot[0::2, 0].tolist() == [2] * 400
    few = assign_copies(placement, visits_both[:100].clone())[0][:, 0]
    assert int(few.sum()) == 75, "3/4 of the tokens that can reach the copy, when all can"
    taken = few.nonzero().flatten()
    assert int((taken[1:] - taken[:-1]).max()) <= 2, "spread evenly in token order"
    assert torch.equal(assign_copies(placement, topk_ids)[0], shard)
    # the shard's load moves the split: shard 1 twice as loaded as the mean -> the copy takes less
    hot = assign_copies(placement, visits_both[:100].clone(), load=torch.tensor([1.0, 3.0]))[0][:, 0]
    assert int(hot.sum()) < 75


def test_shard_load_by_hand():
    placement = ReplicatedPlacement(0, 2, 3, ((0, 1, 2), (2, 3, 0)), (0, 0, 1, 1),
                                    share=((0.5, 1.0, 0.25), (0.75, 1.0, 0.5)))
    load = torch.tensor([[4.0, 2.0, 6.0, 8.0], [0.0, 0.0, 2.0, 0.0]])  # two layers, summed: [4, 2, 8, 8]
    per_shard = shard_load(placement, load)
    assert per_shard.tolist() == [4 * 0.5 + 2 + 8 * 0.25, 8 * 0.75 + 8 + 4 * 0.5]  # [6, 16]
    assert imbalance(placement, load) == pytest.approx(16 / 11)


# ---- rebalancing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,num_shards,redundant", [(TINY, 2, 2), (V2, 4, 4), (V3, 8, 4), (V3, 4, 8),
                                                      (GREEDY, 4, 2), (MOONLIGHT, 8, 2)])
def test_rebalance_lowers_shard_imbalance(cfg, num_shards, redundant):
    hot = hot_in_first_groups(cfg)
    topk_ids = skewed_routing(cfg, 3000, seed=0, hot=hot)
    fresh = skewed_routing(cfg, 3000, seed=1, hot=hot)  # the next window: same skew, other tokens
    load = load_of(cfg, topk_ids)
    today = ReplicatedPlacement.build(cfg, num_shards)
    packed = rebalance(cfg, load, num_shards, 0, version=1)
    copied = rebalance(cfg, load, num_shards, redundant, version=2)
    sampled = rebalance(cfg, load, num_shards, redundant, version=2, topk_ids=topk_ids)
    before, after, with_copies, with_sample = (imbalance(p, topk_ids=topk_ids)
                                               for p in (today, packed, copied, sampled))
    numbers = (f"max/mean tokens per shard: today {before:.3f}, packed {after:.3f}, with {redundant} copies per "
               f"shard {with_copies:.3f} (reach from a sample: {with_sample:.3f})")
    one_group_per_shard = cfg.group_limited and cfg.n_group == num_shards  # packing can only permute
    assert after < before or (one_group_per_shard and after == before), numbers
    assert with_copies < after and with_sample < after, numbers
    assert imbalance(copied, topk_ids=fresh) < imbalance(packed, topk_ids=fresh) <= imbalance(today, topk_ids=fresh)
    # what the rebalancer planned (the shares) against what the tokens did, when it measured who reaches a copy
    planned = imbalance(sampled, load)
    assert abs(planned - with_sample) < 0.1, (planned, numbers)
    assert copied.version == 2 and copied.slots_per_shard == packed.slots_per_shard + redundant
    assert sorted(set(e for row in copied.physical for e in row)) == list(range(cfg.n_routed_experts))


@pytest.mark.parametrize("cfg,num_shards,redundant", [(TINY, 2, 2), (V2, 4, 4), (V3, 8, 4), (GREEDY, 4, 2)])
def test_copies_only_keeps_every_token_on_its_shards(cfg, num_shards, redundant):
    """``keep_primaries``: the primaries stay, so each token reaches no shard outside its home shards (those of its
    experts' primaries, counted by hand from a routing sample: a copy may spare it one), while the copies still
    lower the imbalance."""
    from latentmoe.cluster.eplb import plan_dispatch_replicated

    hot = hot_in_first_groups(cfg)
    topk_ids = skewed_routing(cfg, 2000, seed=0, hot=hot)
    weights = torch.rand(topk_ids.shape)
    today = ReplicatedPlacement.build(cfg, num_shards, redundant)
    kept = rebalance(cfg, load_of(cfg, topk_ids), num_shards, redundant, version=1, keep_primaries=today)
    assert kept.primary_shard == today.primary_shard and kept.max_devices_per_token == today.max_devices_per_token
    assert kept.slots_per_shard == today.slots_per_shard
    primary = torch.tensor(today.primary_shard)
    home = torch.tensor([len(set(primary[row].tolist())) for row in topk_ids])  # [T]
    plan = plan_dispatch_replicated(topk_ids, weights, kept)
    assert bool((plan.devices_per_token <= home).all())
    shards_of_rows = torch.repeat_interleave(torch.arange(num_shards), torch.tensor(plan.send_counts))
    for token in range(0, len(topk_ids), 97):  # and the rows of a token go only to its home shards
        assert set(shards_of_rows[plan.token_index == token].tolist()) <= set(primary[topk_ids[token]].tolist())
    assert imbalance(kept, topk_ids=topk_ids) < imbalance(today, topk_ids=topk_ids)
    with pytest.raises(ValueError, match="keep_primaries has"):
        rebalance(cfg, load_of(cfg, topk_ids), num_shards // 2, redundant, keep_primaries=today)


def test_uniform_load_keeps_balance():
    topk_ids = skewed_routing(V3, 2000, seed=2, hot={})
    load = load_of(V3, topk_ids)
    today = imbalance(ReplicatedPlacement.build(V3, 8), topk_ids=topk_ids)
    copied = imbalance(rebalance(V3, load, 8, 2), topk_ids=topk_ids)
    assert copied <= today + 0.02, (today, copied)


@pytest.mark.parametrize("cfg,num_shards", [(TINY, 1), (TINY, 2), (TINY, 4), (V2, 4), (V2, 8), (V3, 8), (V3, 2)])
def test_hierarchical_keeps_groups_whole(cfg, num_shards):
    hot = hot_in_first_groups(cfg)
    placement = rebalance(cfg, load_of(cfg, skewed_routing(cfg, 1000, 0, hot)), num_shards, min(num_shards - 1, 2))
    per_group = cfg.experts_per_group
    shard_of_group = []
    for g in range(cfg.n_group):
        shards = {placement.primary_shard[e] for e in range(g * per_group, (g + 1) * per_group)}
        assert len(shards) == 1, f"group {g}'s primaries on shards {shards}"
        shard_of_group += shards
    assert [shard_of_group.count(s) for s in range(num_shards)] == [cfg.n_group // num_shards] * num_shards
    assert placement.max_devices_per_token == min(cfg.topk_group, num_shards)
    assert placement.max_devices_per_token == ExpertPlacement.build(cfg, num_shards).max_devices_per_token
    if num_shards > 1:
        assert shard_of_group[0] != shard_of_group[1], "the two hot groups are packed apart"


def test_more_shards_than_groups_give_each_group_its_shards():
    placement = rebalance(TINY, load_of(TINY, skewed_routing(TINY, 1000, 0, hot_in_first_groups(TINY))), 8, 1)
    for g in range(TINY.n_group):  # 4 groups over 8 shards: group g on shards 2g, 2g + 1, two experts each
        primaries = [placement.primary_shard[e] for e in range(4 * g, 4 * g + 4)]
        assert sorted(primaries) == [2 * g, 2 * g, 2 * g + 1, 2 * g + 1], (g, primaries)
    assert placement.max_devices_per_token == 4 == ExpertPlacement.build(TINY, 8).max_devices_per_token


@pytest.mark.parametrize("cfg,num_shards", [(GREEDY, 4), (GREEDY, 3), (MOONLIGHT, 8), (TINY, 3)])
def test_global_packing_without_groups(cfg, num_shards):
    load = torch.arange(cfg.n_routed_experts, 0, -1).double() ** 2  # expert 0 the hottest
    placement = rebalance(cfg, load, num_shards, 0)
    assert placement.max_devices_per_token is None and "no device limit" in placement.device_limit
    assert {placement.primary_shard[e] for e in range(num_shards)} == set(range(num_shards)), "hottest spread"
    per_shard = shard_load(placement, load)
    capacity = -(-cfg.n_routed_experts // num_shards)
    assert max(row.count(-1) for row in placement.physical) == 0  # spare slots (uneven counts) hold copies
    assert all(sum(placement.primary_shard[e] == s for e in range(cfg.n_routed_experts)) <= capacity
               for s in range(num_shards))
    assert float(per_shard.max() - per_shard.min()) <= float(load.max()), per_shard.tolist()


def test_balanced_packing_heaviest_first_onto_lightest():
    assert balanced_packing([5, 4, 3, 3, 2, 1], 2, 3) == [0, 1, 1, 0, 1, 0]  # loads 9 and 9
    assert balanced_packing([0, 0, 0, 0], 2, 2) == [0, 1, 0, 1]  # ties: fewer items, then lower index
    with pytest.raises(ValueError, match="5 items do not fit 2 packs of 2"):
        balanced_packing([1] * 5, 2, 2)


def test_slot_changes_list_what_to_load():
    old = ReplicatedPlacement.build(TINY, 2, 1)
    new = rebalance(TINY, load_of(TINY, skewed_routing(TINY, 500, 0, hot_in_first_groups(TINY))), 2, 1, version=1)
    changes = slot_changes(old, new)
    assert changes and all(new.physical[s][p] == e and old.physical[s][p] != e for s, p, e in changes)
    assert slot_changes(new, new) == []


# ---- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("physical,primary,share,message", [
    (((0, 1), (2, 2)), (0, 0, 1), None, "shard 1 holds expert 2 twice"),
    (((0, 1), (3, 1)), (0, 0, 1, 1), None, "expert 2 has no copy"),
    (((0, 1, 2), (3,)), (0, 0, 0, 1), None, "shard 1 has 1 slots, expected slots_per_shard=3"),
    (((0, 1), (2, 3)), (0, 0, 0, 1), None, r"primary_shard\[2\]=0 holds no copy of expert 2"),
    (((0, 1), (2, 7)), (0, 0, 1, 1), None, "shard 1 slot 1 holds expert 7, outside"),
    (((0, 1), (2, 0)), (0, 0, 1), ((1.0, 1.0), (1.0, 0.5)), "expert 0's copies sum to 1.5"),
    (((0, 1), (2, 0)), (0, 0, 1), ((1.5, 1.0), (1.0, -0.5)), "shard 0 slot 0 has share 1.5"),
])
def test_placement_validation(physical, primary, share, message):
    slots = max(len(row) for row in physical)
    with pytest.raises(ValueError, match=message):
        ReplicatedPlacement(0, 2, slots, physical, primary, share=share)


def test_boundary_validation():
    with pytest.raises(ValueError, match="version must be a non-negative integer"):
        ReplicatedPlacement(-1, 1, 1, ((0,),), (0,))
    with pytest.raises(ValueError, match=r"load must be \[layers, n_routed_experts=16\]"):
        rebalance(TINY, torch.ones(15), 2)
    with pytest.raises(ValueError, match="load must be finite and non-negative"):
        rebalance(TINY, -torch.ones(16), 2)
    with pytest.raises(ValueError, match=r"expert shards must be in \[1, n_routed_experts=16\]"):
        rebalance(TINY, torch.ones(16), 17)
    with pytest.raises(ValueError, match="redundant_per_shard must be a non-negative integer"):
        rebalance(TINY, torch.ones(16), 2, -1)
    with pytest.raises(ValueError, match="redundant_per_shard=9 gives 17 slots per shard"):
        ReplicatedPlacement.build(TINY, 2, 9)
    dense = ModelConfig.from_dict(TINY_CONFIG | dict(n_routed_experts=None))
    with pytest.raises(ValueError, match="dense model"):
        rebalance(dense, torch.ones(16), 2)
    limited = ReplicatedPlacement(0, 2, 8, tuple(tuple(range(8 * s, 8 * s + 8)) for s in range(2)),
                                  tuple([0] * 8 + [1] * 8), max_devices_per_token=1)
    with pytest.raises(ValueError, match="max_devices_per_token=1 does not hold: topk_group=2 groups can reach 2"):
        limited.check_config(TINY)
    with pytest.raises(ValueError, match="claims a device limit"):
        limited.check_config(GREEDY)
    with pytest.raises(ValueError, match="placement has 16 experts, config n_routed_experts=160"):
        limited.check_config(V2)


def test_shards_for_work_follows_the_measured_work():
    from latentmoe.cluster.eplb import shards_for_work

    summary = {"window_s": 10.0, "pairs_per_shard": [3000, 1000]}  # 400 pairs/s
    assert shards_for_work(summary, 2, target_pairs_per_s=100) == 4
    assert shards_for_work(summary, 2, target_pairs_per_s=100, max_shards=3) == 3
    assert shards_for_work({"window_s": 10.0, "pairs_per_shard": [0, 0]}, 4, target_pairs_per_s=100,
                           min_shards=2) == 2
    with pytest.raises(ValueError, match="target_pairs_per_s must be > 0"):
        shards_for_work(summary, 2, target_pairs_per_s=0)


def test_expert_shards_policy_settings_are_checked():
    from latentmoe.engine.engine_config import EngineConfig

    ok = EngineConfig(model="m", eplb_interval_s=5, expert_shards_policy="latentmoe.cluster.eplb:shards_for_work",
                      expert_shards_policy_args={"target_pairs_per_s": 100})
    assert EngineConfig.from_dict({k: getattr(ok, k) for k in ("model", "eplb_interval_s", "expert_shards_policy",
                                                               "expert_shards_policy_args")}) == ok
    with pytest.raises(ValueError, match="'module:function'"):
        EngineConfig(model="m", eplb_interval_s=5, expert_shards_policy="shards_for_work")
    with pytest.raises(ValueError, match="set eplb_interval_s > 0"):
        EngineConfig(model="m", expert_shards_policy="latentmoe.cluster.eplb:shards_for_work")
    with pytest.raises(ValueError, match="must be a mapping"):
        EngineConfig(model="m", expert_shards_policy_args=[1])
