"""The expert placement map: logical expert -> (expert shard, slot).

Groups are placed whole on a shard, so a token routed within ``topk_group`` groups
reaches at most ``topk_group`` shards (device-limited routing). With plain greedy
routing (one group, as in V2-Lite) experts are spread evenly and nothing limits the
number of shards a token reaches.
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

    @classmethod
    def build(cls, config: ModelConfig, num_shards: int) -> "ExpertPlacement":
        n = config.n_routed_experts
        if not 1 <= num_shards <= n:
            raise ValueError(f"expert shards must be in [1, n_routed_experts={n}], got {num_shards}")
        grouped = config.topk_method == "group_limited_greedy" and (config.n_group or 1) > 1
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
        return cls(num_shards, tuple(shard), tuple(slots), limit)

    def experts_on(self, shard: int) -> list[int]:
        return [e for e, s in enumerate(self.shard_of_expert) if s == shard]

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``shard_of_expert [E]``, ``slot_of_expert [E]`` as long tensors (for the dispatch arithmetic)."""
        return (torch.tensor(self.shard_of_expert, dtype=torch.long, device=device),
                torch.tensor(self.slot_of_expert, dtype=torch.long, device=device))
