"""The expert placement map: logical expert -> (expert shard, slot).

Groups are placed whole on a shard, so a token routed within ``topk_group`` groups
reaches at most ``topk_group`` shards (device-limited routing: V2's ``group_limited_greedy``
and V3's ``noaux_tc``). With plain greedy routing (V2-Lite) or a single group (Kimi-K2,
Moonlight: ``n_group: 1``) experts are spread evenly and nothing limits the number of
shards a token reaches; ``device_limit`` says which case a placement is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentmoe.model.config import ModelConfig


@dataclass(frozen=True)
class ExpertPlacement:
    num_shards: int
    shard_of_expert: tuple[int, ...]  # [num_experts]
    slot_of_expert: tuple[int, ...]  # [num_experts] index among that shard's experts
    max_devices_per_token: int | None  # topk_group when groups are whole on shards, else None
    device_limit: str = ""  # in words: what bounds the expert shards a token reaches, or why nothing does

    @classmethod
    def build(cls, config: ModelConfig, num_shards: int) -> "ExpertPlacement":
        n = config.n_routed_experts
        if not 1 <= num_shards <= n:
            raise ValueError(f"expert shards must be in [1, n_routed_experts={n}], got {num_shards}")
        grouped = config.group_limited
        if grouped:
            G, per_group = config.n_group, config.experts_per_group
            if G % num_shards and num_shards % G:
                raise ValueError(
                    f"{num_shards} expert shards cannot hold {G} expert groups whole: use a divisor or a "
                    f"multiple of n_group={G}")
        shard = []
        if grouped and num_shards <= config.n_group:
            # contiguous runs of whole groups: groups [s*G/S, (s+1)*G/S) on shard s
            per_shard = config.n_group // num_shards
            shard = [(e // config.experts_per_group) // per_shard for e in range(n)]
            limit = min(config.topk_group, num_shards)
        else:
            # contiguous, balanced slices of experts
            shard = [e * num_shards // n for e in range(n)]
            limit = None
            if grouped:  # more shards than groups: each group spans num_shards / G shards
                limit = config.topk_group * (num_shards // config.n_group)
        slots, seen = [], [0] * num_shards
        for e in range(n):
            slots.append(seen[shard[e]])
            seen[shard[e]] += 1
        if min(seen) == 0:
            raise ValueError(f"placement leaves an expert shard empty ({seen} experts per shard)")
        return cls(num_shards, tuple(shard), tuple(slots), limit, _device_limit(config, num_shards, limit))

    def experts_on(self, shard: int) -> list[int]:
        return [e for e, s in enumerate(self.shard_of_expert) if s == shard]

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``shard_of_expert [E]``, ``slot_of_expert [E]`` as long tensors (for the dispatch arithmetic)."""
        return (torch.tensor(self.shard_of_expert, dtype=torch.long, device=device),
                torch.tensor(self.slot_of_expert, dtype=torch.long, device=device))


def _device_limit(config: ModelConfig, num_shards: int, limit: int | None) -> str:
    if limit is not None:
        return (f"a token reaches at most {limit} of {num_shards} expert shards: {config.topk_method} keeps "
                f"topk_group={config.topk_group} of n_group={config.n_group} groups, placed whole")
    if config.topk_method == "greedy":
        reason = "greedy routing (topk_method 'greedy') has no groups"
    else:
        reason = f"{config.topk_method} over one group (n_group={config.n_group or 1}) limits nothing"
    return f"no device limit: {reason}, so a token may reach all {num_shards} expert shards"
