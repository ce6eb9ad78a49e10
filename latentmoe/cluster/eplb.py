"""Online expert-parallel load balancing (issue #18): a versioned placement with redundant copies of hot experts,
the rule by which a token picks a copy, and the rebalancer that builds the next placement from measured load.

Every expert shard has the same number of slots; a slot holds one logical expert, and a hot expert may hold slots
on several shards. Copies hold identical parameters, so the copy a token uses changes the load, never the output.
Each expert has one *primary* copy, and a token's *home* shards are the shards of its experts' primaries. A token
uses a copy only on a home shard, so replication never raises the number of shards a token reaches: with groups
whole on shards that stays at most ``topk_group`` **wherever a copy is placed**. Each copy has a planned ``share``
of its expert's tokens (from the rebalancer's measured load); in a batch, a copy takes that share of the expert's
tokens from those that can use it (all of them if fewer), evenly spaced in token order, and the primary keeps the
rest: deterministic, and exact wherever enough tokens can reach the copy.

Where copies go. DeepSeek's EPLB packs groups onto nodes and replicates hot experts inside their node, because
its device limit counts nodes and a token may use any GPU of a node it visits. Here the limit counts shards, and a
copy on the primary's own shard is useless, so "within the group's shards" can only mean a group spanning several
shards. A copy of expert e on another shard s takes only those tokens of e that visit s anyway (for some other
expert), so where it helps most is the product of the load it can take (e's tokens that also visit s: counted in
a routing sample, or estimated for uniform routing) and the gap it closes. The rebalancer:

1. packs whole groups onto shards by load (greedy balanced packing, ``n_group / S`` groups per shard); with more
   shards than groups each group gets its own ``S / n_group`` shards and its experts are packed over them;
   without groups (greedy routing, one group, or groups that do not divide over the shards) it packs experts;
2. fills the redundant slots one copy at a time: out of the hottest shard that can shed load, the copy (of one
   of its experts, on a cooler shard) that moves the most, at most half their gap and at most ``_MAX_SHARE`` of
   the tokens that could use it. A copy that cannot help gets share 0: a spare, loaded but unused until a later
   placement (every shard has the same slots, and a hot shard's spare slots have nowhere cooler to take from).

One placement serves every MoE layer (the load is summed over layers): one slot table and one weight load per
epoch; a placement per layer is a later refinement.

Legend: T tokens, K experts per token, E logical experts, S expert shards, P slots per shard, C most copies of
one expert, L MoE layers, N routing samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from latentmoe.cluster.dispatch import DispatchPlan, plan_dispatch
from latentmoe.cluster.placement import ExpertPlacement, _device_limit
from latentmoe.model.config import ModelConfig

_MAX_SHARE = 0.9  # a copy takes at most this share of the tokens that could use it; the primary keeps the rest


@dataclass(frozen=True)
class ReplicatedPlacement:
    """A versioned expert placement with redundant copies.

    ``physical[s][p]``: the logical expert in slot ``p`` of shard ``s`` (``-1``: an empty slot, only where
    today's placement gives shards unequal numbers of experts). ``primary_shard[e]``: where expert ``e``'s primary
    copy is, the shard that decides which shards a token visits. ``share[s][p]``: the planned share of its
    expert's tokens that the slot takes (the copies of an expert sum to 1).
    """

    version: int
    num_shards: int
    slots_per_shard: int
    physical: tuple[tuple[int, ...], ...]  # [S][P]
    primary_shard: tuple[int, ...]  # [E]
    max_devices_per_token: int | None = None  # topk_group when groups are whole on shards, else None
    share: tuple[tuple[float, ...], ...] | None = None  # [S][P]; None: split evenly over an expert's copies
    device_limit: str = ""  # in words
    copies: tuple[tuple[tuple[int, int], ...], ...] = field(init=False, repr=False, compare=False)  # [E][copies]
    _tables: dict = field(init=False, repr=False, compare=False, hash=False)  # device -> copy tables

    def __post_init__(self):
        S, P = self.num_shards, self.slots_per_shard
        if not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be a non-negative integer, got {self.version!r}")
        if S < 1 or P < 1:
            raise ValueError(f"num_shards and slots_per_shard must be positive, got {S} and {P}")
        if len(self.physical) != S:
            raise ValueError(f"physical has {len(self.physical)} shards, expected num_shards={S}")
        E = len(self.primary_shard)
        if E < 1:
            raise ValueError("primary_shard is empty: a placement needs at least one expert")
        copies: list[list[tuple[int, int]]] = [[] for _ in range(E)]
        for s, row in enumerate(self.physical):
            if len(row) != P:
                raise ValueError(f"shard {s} has {len(row)} slots, expected slots_per_shard={P} (equal on all shards)")
            for p, e in enumerate(row):
                if not -1 <= e < E:
                    raise ValueError(f"shard {s} slot {p} holds expert {e}, outside [0, {E}) (or -1 for empty)")
                if e >= 0:
                    if copies[e] and copies[e][-1][0] == s:
                        raise ValueError(f"shard {s} holds expert {e} twice (slots {copies[e][-1][1]} and {p})")
                    copies[e].append((s, p))
        for e in range(E):
            if not copies[e]:
                raise ValueError(f"expert {e} has no copy on any shard")
            home = self.primary_shard[e]
            first = [c for c in copies[e] if c[0] == home]
            if not first:
                raise ValueError(f"primary_shard[{e}]={home} holds no copy of expert {e}")
            copies[e] = first + [c for c in copies[e] if c[0] != home]
        share = self.share
        if share is None:
            share = tuple(tuple(1 / len(copies[e]) if e >= 0 else 0.0 for e in row) for row in self.physical)
            object.__setattr__(self, "share", share)
        if len(share) != S or any(len(row) != P for row in share):
            raise ValueError(f"share must have the shape of physical, [{S}][{P}]")
        for s, row in enumerate(share):
            for p, x in enumerate(row):
                if not (math.isfinite(x) and 0 <= x <= 1):
                    raise ValueError(f"shard {s} slot {p} has share {x}: shares must be in [0, 1]")
        for e in range(E):
            total = sum(share[s][p] for s, p in copies[e])
            if abs(total - 1) > 1e-6:
                raise ValueError(f"the shares of expert {e}'s copies sum to {total}, not 1")
        if self.max_devices_per_token is not None and not 1 <= self.max_devices_per_token <= S:
            raise ValueError(f"max_devices_per_token must be in [1, num_shards={S}] or None, "
                             f"got {self.max_devices_per_token}")
        object.__setattr__(self, "copies", tuple(tuple(c) for c in copies))
        object.__setattr__(self, "_tables", {})

    # ---- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def from_placement(cls, placement: ExpertPlacement, version: int = 0) -> "ReplicatedPlacement":
        """Today's mapping, no copies (shards with fewer experts than the fullest get empty slots)."""
        S, E = placement.num_shards, len(placement.shard_of_expert)
        P = max(placement.slot_of_expert) + 1
        physical = [[-1] * P for _ in range(S)]
        for e in range(E):
            physical[placement.shard_of_expert[e]][placement.slot_of_expert[e]] = e
        return cls(version, S, P, tuple(map(tuple, physical)), tuple(placement.shard_of_expert),
                   placement.max_devices_per_token, device_limit=placement.device_limit)

    @classmethod
    def build(cls, config: ModelConfig, num_shards: int, redundant_per_shard: int = 0,
              version: int = 0) -> "ReplicatedPlacement":
        """Today's mapping (``ExpertPlacement.build``) and ``redundant_per_shard`` more slots on every shard, filled
        with copies spread round-robin, each expert's tokens split evenly over its copies: a start before any load
        has been measured."""
        base = cls.from_placement(ExpertPlacement.build(config, num_shards), version)
        _check_redundant(redundant_per_shard, base.slots_per_shard, base.num_experts)
        if redundant_per_shard == 0:
            return base
        P = base.slots_per_shard + redundant_per_shard
        num_copies = [1] * base.num_experts
        physical = []
        for s in range(num_shards):
            row = [e for e in base.physical[s] if e >= 0]
            while len(row) < P:  # the expert with fewest copies not here, starting after this shard's own
                e = min((e for e in range(base.num_experts) if e not in row),
                        key=lambda e: (num_copies[e], (e - row[0]) % base.num_experts))
                num_copies[e] += 1
                row.append(e)
            physical.append(tuple(row))
        placement = cls(version, num_shards, P, tuple(physical), base.primary_shard, base.max_devices_per_token,
                        device_limit=base.device_limit)
        placement.check_config(config)
        return placement

    # ---- lookups ------------------------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return len(self.primary_shard)

    @property
    def num_copies(self) -> int:
        """Copies beyond the primaries (the redundant slots in use)."""
        return sum(len(c) for c in self.copies) - self.num_experts

    def experts_on(self, shard: int) -> list[int]:
        """The logical expert of each slot of ``shard`` (``-1``: empty): what that expert shard loads."""
        return list(self.physical[shard])

    def copy_tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``copy_shard [E, C]``, ``copy_slot [E, C]`` (long, primary in column 0, ``-1`` padding) and
        ``copy_share [E, C]`` (float64, 0 padding); made once per device."""
        key = str(device)
        if key not in self._tables:
            C = max(len(c) for c in self.copies)
            pad = [(-1, -1)] * C
            rows = [list(c) + pad[len(c):] for c in self.copies]
            shard = torch.tensor([[s for s, _ in r] for r in rows], dtype=torch.long)
            slot = torch.tensor([[p for _, p in r] for r in rows], dtype=torch.long)
            share = torch.tensor([[self.share[s][p] if s >= 0 else 0.0 for s, p in r] for r in rows],
                                 dtype=torch.float64)
            self._tables[key] = (shard.to(device), slot.to(device), share.to(device))
        return self._tables[key]

    def check_config(self, config: ModelConfig) -> None:
        """Raise ``ValueError`` unless this placement fits ``config`` and its ``max_devices_per_token`` holds: the
        ``topk_group`` groups whose primaries span most shards span at most that many."""
        if config.n_routed_experts != self.num_experts:
            raise ValueError(f"placement has {self.num_experts} experts, config n_routed_experts="
                             f"{config.n_routed_experts}")
        if self.max_devices_per_token is None:
            return
        if not config.group_limited:
            raise ValueError(f"max_devices_per_token={self.max_devices_per_token} claims a device limit, but "
                             f"topk_method {config.topk_method!r} over n_group={config.n_group} limits nothing")
        per_group = config.experts_per_group
        spans = sorted((len({self.primary_shard[e] for e in range(g * per_group, (g + 1) * per_group)})
                        for g in range(config.n_group)), reverse=True)
        bound = min(sum(spans[:config.topk_group]), self.num_shards)
        if bound > self.max_devices_per_token:
            raise ValueError(f"max_devices_per_token={self.max_devices_per_token} does not hold: topk_group="
                             f"{config.topk_group} groups can reach {bound} shards")


# ---- routing with copies -----------------------------------------------------------------------------------------


def assign_copies(placement: ReplicatedPlacement, topk_ids: torch.Tensor,
                  load: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, K]`` -> ``shard [T, K]``, ``slot [T, K]``: the copy each (token, expert) uses.

    Only copies on the token's home shards (its experts' primaries) are candidates. Copy by copy, each takes its
    ``share`` of its expert's tokens in this batch from those still on the primary that can use it (all of them
    if fewer), evenly spaced in token order. ``load [S]``, each shard's current load (say over the last window),
    scales the copies' shares by how much cooler than the mean their shard is. Deterministic in its inputs."""
    copy_shard, copy_slot, copy_share = placement.copy_tables(topk_ids.device)  # [E, C]
    shard, slot = copy_shard[topk_ids, 0], copy_slot[topk_ids, 0]  # [T, K] primaries
    C = copy_shard.shape[1]
    if C == 1 or topk_ids.numel() == 0:
        return shard, slot
    T, K = topk_ids.shape
    E, device = placement.num_experts, topk_ids.device
    share = copy_share  # [E, C]
    if load is not None:
        load = load.to(device=device, dtype=torch.float64)  # [S]
        share = share * ((load.mean() + 1) / (load + 1))[copy_shard.clamp(min=0)]  # [E, C]
        share = share / share[:, 1:].sum(1, keepdim=True).clamp(min=1)  # copies take at most all of it
    home = torch.zeros(T, placement.num_shards, dtype=torch.bool, device=device)
    home.scatter_(1, shard, True)  # [T, S]
    flat = topk_ids.flatten()  # [T*K]
    token = torch.arange(T, device=device).repeat_interleave(K)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K] grouped by expert, token order within
    by_expert = flat[order]  # [T*K]
    num_tokens = torch.bincount(flat, minlength=E).double()  # [E]
    first = (num_tokens.cumsum(0) - num_tokens).long()  # [E] where each expert's run starts in `order`
    shard, slot = shard.flatten().clone(), slot.flatten().clone()  # [T*K]
    on_primary = torch.ones_like(flat, dtype=torch.bool)  # [T*K]
    for c in range(1, C):
        to_shard = copy_shard[flat, c]  # [T*K] -1 where the expert has no c-th copy
        can = on_primary & (to_shard >= 0) & home[token, to_shard.clamp(min=0)]  # [T*K]
        num_can = torch.bincount(flat, weights=can.double(), minlength=E)  # [E]
        wanted = share[:, c] * num_tokens + 1e-9  # [E] tokens this copy should take (1e-9: 3 - ulp is still 3)
        rate = (wanted / num_can.clamp(min=1)).clamp(max=1)  # [E] of those that can
        can_sorted = can[order]
        before = can_sorted.cumsum(0) - can_sorted.long()  # [T*K] eligible ones earlier in the order
        rank = (before - before[first[by_expert]]).double()  # [T*K] rank among its expert's eligible ones
        r = rate[by_expert]
        take_sorted = can_sorted & (torch.floor((rank + 1) * r) > torch.floor(rank * r))  # every 1/r-th
        take = torch.empty_like(can)
        take[order] = take_sorted
        shard = torch.where(take, to_shard, shard)
        slot = torch.where(take, copy_slot[flat, c], slot)
        on_primary &= ~take
    return shard.view(T, K), slot.view(T, K)


def plan_dispatch_replicated(topk_ids: torch.Tensor, topk_weights: torch.Tensor, placement: ReplicatedPlacement,
                             load: torch.Tensor | None = None) -> DispatchPlan:
    """``plan_dispatch`` with copies: each token once per shard it reaches, its slot ids there (``-1`` for
    experts it uses elsewhere). With no copies, exactly ``plan_dispatch``'s plan."""
    shard, slot = assign_copies(placement, topk_ids, load)  # [T, K]
    T, K = topk_ids.shape
    # plan_dispatch over positions: each (token, k) is its own "expert", on the shard and slot chosen above
    positions = torch.arange(T * K, device=topk_ids.device).view(T, K)
    return plan_dispatch(positions, topk_weights, shard.flatten(), slot.flatten(), placement.num_shards)


# ---- rebalancing -------------------------------------------------------------------------------------------------


def balanced_packing(weights: Sequence[float], num_packs: int, capacity: int) -> list[int]:
    """The pack of each item: heaviest first onto the lightest pack with room (ties: fewer items, lower index)."""
    if num_packs * capacity < len(weights):
        raise ValueError(f"{len(weights)} items do not fit {num_packs} packs of {capacity}")
    pack_load, pack_size = [0.0] * num_packs, [0] * num_packs
    pack = [-1] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        p = min((q for q in range(num_packs) if pack_size[q] < capacity), key=lambda q: (pack_load[q], pack_size[q], q))
        pack[i] = p
        pack_load[p] += weights[i]
        pack_size[p] += 1
    return pack


def rebalance(config: ModelConfig, load: torch.Tensor, num_shards: int, redundant_per_shard: int = 0,
              version: int = 0, topk_ids: torch.Tensor | None = None,
              keep_primaries: ReplicatedPlacement | None = None) -> ReplicatedPlacement:
    """The placement that balances ``load [L, E]`` (or ``[E]``: tokens per expert over a window, summed over
    layers) over ``num_shards`` shards with ``redundant_per_shard`` copy slots each.

    Groups whole on shards when the model is group-limited and ``n_group`` and ``num_shards`` divide one another
    (the device limit of ``ExpertPlacement`` kept); experts one by one otherwise. ``topk_ids [..., K]``, a sample of
    the window's routing, tells which tokens a copy could take; without it uniform routing is assumed.

    ``keep_primaries``: keep that placement's primaries (and so the shards every token visits) and only place the
    copies anew. Repacking groups by load may split groups that tokens choose together, so that tokens reach more
    shards (more rows to send and compute); copies alone never add a shard to a token."""
    E = _check_experts(config)
    load = _check_load(load, E)  # [E]
    if not isinstance(num_shards, int) or not 1 <= num_shards <= E:
        raise ValueError(f"expert shards must be in [1, n_routed_experts={E}], got {num_shards!r}")
    S = num_shards
    G = config.n_group or 1
    if keep_primaries is not None:
        if keep_primaries.num_shards != S or keep_primaries.num_experts != E:
            raise ValueError(f"keep_primaries has {keep_primaries.num_shards} shards and "
                             f"{keep_primaries.num_experts} experts, expected {S} and {E}")
        primary, limit = list(keep_primaries.primary_shard), keep_primaries.max_devices_per_token
    elif config.group_limited and G % S == 0:  # whole groups per shard
        shard_of_group = balanced_packing(load.view(G, -1).sum(1).tolist(), S, G // S)
        primary = [shard_of_group[e // config.experts_per_group] for e in range(E)]
        limit = min(config.topk_group, S)
    elif config.group_limited and S % G == 0:  # each group on its own S / G shards
        span, per_group = S // G, config.experts_per_group
        primary = []
        for g in range(G):
            packs = balanced_packing(load[g * per_group:(g + 1) * per_group].tolist(), span, -(-per_group // span))
            primary += [g * span + p for p in packs]
        limit = config.topk_group * span
    else:
        primary, limit = balanced_packing(load.tolist(), S, -(-E // S)), None
    if topk_ids is not None:
        reach = _reach_sampled(topk_ids, primary, S)
    else:
        reach = _reach_uniform(config, primary, S, whole_groups=limit is not None and G >= S)
    physical, share = _place_copies(load, primary, S, redundant_per_shard, reach)
    placement = ReplicatedPlacement(version, S, len(physical[0]), physical, tuple(primary), limit, share,
                                    _describe_limit(config, S, limit))
    placement.check_config(config)
    return placement


def _place_copies(load: torch.Tensor, primary: list[int], S: int, redundant_per_shard: int,
                  reach: torch.Tensor) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Fill every shard to the same slot count with copies, greedily where each moves most load (see the module
    docstring). ``reach [E, S]``: the share of an expert's tokens that visit each shard."""
    E = len(primary)
    own = [[e for e in range(E) if primary[e] == s] for s in range(S)]
    P = max(len(o) for o in own) + _check_redundant(redundant_per_shard, max(len(o) for o in own), E)
    primary_t = torch.tensor(primary)  # [E]
    shard_load = torch.zeros(S, dtype=torch.float64).index_add_(0, primary_t, load)  # [S] estimated
    left = load.clone()  # [E] load still on each primary
    holds = torch.zeros(E, S, dtype=torch.bool)  # [E, S]
    holds[torch.arange(E), primary_t] = True
    free = torch.tensor([P - len(o) for o in own])  # [S]
    extra: list[list[tuple[int, float]]] = [[] for _ in range(S)]
    for _ in range(int(free.sum())):
        avail = left[:, None] * reach  # [E, S] tokens at the primary that could use a copy on each shard
        gap = (shard_load[primary_t][:, None] - shard_load[None, :]) / 2  # [E, S]
        move = torch.minimum(avail * _MAX_SHARE, gap).clamp(min=0)  # [E, S]
        ok = ~holds & (free > 0)[None, :]  # [E, S]
        helps = ok & (move > 0)  # [E, S]
        if helps.any():  # the biggest move out of the hottest shard that can shed load
            source = shard_load[primary_t][:, None].expand(E, S)  # [E, S]
            hottest = torch.where(helps, source, -1.0).max()
            best = int(torch.where(helps & (source == hottest), move, -1.0).argmax())
        else:  # nothing helps: a spare copy of the expert with most load it could take
            best = int(torch.where(ok, avail, -1.0).argmax())
        e, s = divmod(best, S)
        x = float(move[e, s])
        extra[s].append((e, x / float(load[e]) if x > 0 else 0.0))
        shard_load[primary[e]] -= x
        shard_load[s] += x
        left[e] -= x
        holds[e, s] = True
        free[s] -= 1
    copied = [0.0] * E  # share of each expert's tokens its copies take
    for s in range(S):
        for e, x in extra[s]:
            copied[e] += x
    physical = tuple(tuple(own[s] + [e for e, _ in sorted(extra[s])]) for s in range(S))
    share = tuple(tuple([1.0 - copied[e] for e in own[s]] + [x for _, x in sorted(extra[s])]) for s in range(S))
    return physical, share


def _reach_sampled(topk_ids: torch.Tensor, primary: list[int], S: int) -> torch.Tensor:
    """``[E, S]``: of the sampled tokens that chose each expert, the share that visit each shard."""
    ids = topk_ids.reshape(-1, topk_ids.shape[-1]).long().cpu()  # [N, K]
    E = len(primary)
    home = torch.zeros(ids.shape[0], S, dtype=torch.float64)
    home.scatter_(1, torch.tensor(primary)[ids], 1.0)  # [N, S]
    visits = torch.zeros(E, S, dtype=torch.float64)
    for k in range(ids.shape[1]):
        visits.index_add_(0, ids[:, k], home)
    chosen = torch.bincount(ids.flatten(), minlength=E).double()  # [E]
    return visits / chosen.clamp(min=1)[:, None]


def _reach_uniform(config: ModelConfig, primary: list[int], S: int, whole_groups: bool) -> torch.Tensor:
    """``[E, S]`` for uniform routing: the chance a token of expert e also visits shard s, from the
    ``topk_group - 1`` other groups it picks (groups whole on shards) or its other ``K - 1`` experts."""
    E = len(primary)
    on_shard = torch.bincount(torch.tensor(primary), minlength=S).tolist()  # [S]
    reach = torch.ones(E, S, dtype=torch.float64)
    if whole_groups:
        G, M, per_shard = config.n_group, config.topk_group, config.n_group // S
        reach *= 1 - math.comb(max(G - 1 - per_shard, 0), M - 1) / math.comb(G - 1, M - 1)
    else:
        K = config.num_experts_per_tok
        for s in range(S):
            reach[:, s] = 1 - math.comb(max(E - 1 - on_shard[s], 0), K - 1) / math.comb(E - 1, K - 1)
    reach[torch.arange(E), torch.tensor(primary)] = 1.0
    return reach


def _describe_limit(config: ModelConfig, S: int, limit: int | None) -> str:
    """``ExpertPlacement``'s words (``placement._device_limit``), with what copies add to them."""
    if limit is None and config.group_limited:  # a case ExpertPlacement refuses
        return (f"no device limit: n_group={config.n_group} groups cannot be placed whole on {S} expert shards, so "
                f"experts are packed one by one")
    words = _device_limit(config, S, limit)
    return words + ", copies used only on shards a token already visits" if limit is not None else words


def _check_experts(config: ModelConfig) -> int:
    if not config.n_routed_experts:
        raise ValueError("a dense model (n_routed_experts null) has no experts to place")
    return config.n_routed_experts


def _check_load(load: torch.Tensor, num_experts: int) -> torch.Tensor:
    load = torch.as_tensor(load, dtype=torch.float64).cpu()
    if load.dim() == 1:
        load = load[None]
    if load.dim() != 2 or load.shape[1] != num_experts:
        raise ValueError(f"load must be [layers, n_routed_experts={num_experts}] or [{num_experts}], "
                         f"got {list(load.shape)}")
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must be finite and non-negative (tokens per expert)")
    return load.sum(0)


def _check_redundant(redundant_per_shard: int, most_primaries: int, num_experts: int) -> int:
    if not isinstance(redundant_per_shard, int) or redundant_per_shard < 0:
        raise ValueError(f"redundant_per_shard must be a non-negative integer, got {redundant_per_shard!r}")
    if most_primaries + redundant_per_shard > num_experts:
        raise ValueError(f"redundant_per_shard={redundant_per_shard} gives {most_primaries + redundant_per_shard} "
                         f"slots per shard, more than the {num_experts} experts (a shard holds an expert once)")
    return redundant_per_shard


# ---- measures ----------------------------------------------------------------------------------------------------


def shard_load(placement: ReplicatedPlacement, load: torch.Tensor | None = None,
               topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[S]`` float64 (token, expert) pairs each shard computes. With ``topk_ids [T, K]``: exactly, as
    ``assign_copies`` routes them. Else from ``load [L, E]`` or ``[E]``, each expert's load split over its copies
    by the planned shares (what ``assign_copies`` does where enough tokens can reach each copy)."""
    S = placement.num_shards
    if topk_ids is not None:
        shard, _ = assign_copies(placement, topk_ids)
        return torch.bincount(shard.flatten().cpu(), minlength=S).double()
    if load is None:
        raise ValueError("shard_load needs load or topk_ids")
    load = _check_load(load, placement.num_experts)  # [E]
    copy_shard, _, share = placement.copy_tables()  # [E, C]
    valid = copy_shard >= 0
    return torch.zeros(S, dtype=torch.float64).index_add_(0, copy_shard[valid], (share * load[:, None])[valid])


def imbalance(placement: ReplicatedPlacement, load: torch.Tensor | None = None,
              topk_ids: torch.Tensor | None = None) -> float:
    """Max over mean of ``shard_load`` (1.0: perfectly balanced)."""
    per_shard = shard_load(placement, load, topk_ids)
    mean = float(per_shard.mean())
    return float(per_shard.max()) / mean if mean > 0 else 1.0


def slot_changes(old: ReplicatedPlacement, new: ReplicatedPlacement) -> list[tuple[int, int, int]]:
    """``(shard, slot, expert)`` for every slot of ``new`` whose expert differs from ``old``'s: the weights each
    expert shard must load before the epoch of ``new`` begins."""
    if old.num_shards != new.num_shards or old.num_experts != new.num_experts:
        raise ValueError(f"placements differ in shape: {old.num_shards} vs {new.num_shards} shards, "
                         f"{old.num_experts} vs {new.num_experts} experts")
    return [(s, p, e) for s in range(new.num_shards) for p, e in enumerate(new.physical[s])
            if e >= 0 and (p >= old.slots_per_shard or old.physical[s][p] != e)]


def shards_for_work(summary: dict, num_expert: int, *, target_pairs_per_s: float, min_shards: int = 1,
                    max_shards: int | None = None) -> int:
    """A policy for ``expert_shards_policy``: as many expert shards as the measured work asks for, at
    ``target_pairs_per_s`` (token, expert) pairs computed per shard per second (over the window's length), within
    ``min_shards..max_shards``; like Serve's target of ongoing requests for the attention shards."""
    if not target_pairs_per_s > 0:
        raise ValueError(f"target_pairs_per_s must be > 0, got {target_pairs_per_s!r}")
    rate = sum(summary.get("pairs_per_shard") or []) / float(summary["window_s"])
    wanted = max(min_shards, math.ceil(rate / target_pairs_per_s))
    return min(wanted, max_shards) if max_shards is not None else wanted
