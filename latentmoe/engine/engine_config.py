"""The serving configuration: one dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    model: str  # checkpoint directory
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    # latent cache: explicit num_blocks, else cache_bytes, else a fraction of available memory
    block_size: int = 64
    num_blocks: int | None = None
    cache_bytes: int | None = None
    cache_memory_fraction: float | None = None  # default: 0.9 on CUDA (of free memory), 0.05 on CPU
    # scheduler
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # kernels: "auto" (Triton on CUDA, Numba on CPU: latentmoe.kernels), "triton", "numba", "torch" (the
    # references everywhere)
    kernels: str = "auto"
    prefill_mla: str = "naive"  # "naive" (materialised K/V) or "absorbed"
    seed: int = 0  # for unseeded sampled requests
    # disaggregated cluster: micro-batches per step (ping-pong: while one's tokens are at the experts, the other
    # runs attention). 1: one batch; 2: two; 0: on CUDA, two when an attention shard has at least 4 requests, else
    # one; on CPU one (measured faster where shards share cores)
    micro_batches: int = 0
    # disaggregated cluster: a forward pass of at most this many tokens (decode) sends its rows of every MoE layer
    # after the first with their count inside, in a block of fixed size per expert shard: two exchanges per layer
    # instead of three (counts, rows, sums). 0: always three. Larger passes (prefill) always send counts first.
    padded_dispatch_tokens: int = 256
    # disaggregated cluster, CPU: torch threads for an attention shard's forward pass of at least
    # ``latentmoe.cluster.shards.PREFILL_MIN_TOKENS`` tokens (prefill: bound by compute, and the expert shards wait
    # for the dense layers it runs); its other passes (decode) run on the shard's own threads, its Ray CPUs.
    # 0: the cores the shard's process may run on; never fewer than the shard's own
    prefill_threads: int = 0
    # disaggregated cluster, expert load balancing (``latentmoe.cluster.eplb``): redundant slots per expert shard
    # (copies of hot experts); every eplb_interval_s seconds (0: only when asked) the coordinator rebalances if the
    # expert shards' imbalance (max / mean tokens over the last eplb_window_s) is above eplb_threshold.
    # eplb_mode "repack": DeepSeek's hierarchical EPLB, groups packed onto shards by load, then copies (it may split
    # groups that tokens choose together, so tokens reach more shards); "copies": keep each expert's primary where
    # it is (so the shards each token visits) and move only the copies, which take only tokens that visit their
    # shard anyway (benchmarks/bench_eplb.py measures both)
    eplb_mode: str = "repack"
    redundant_experts: int = 0
    eplb_interval_s: float = 0.0
    eplb_window_s: float = 60.0
    eplb_threshold: float = 1.2
    # the number of expert shards by a policy: "module:function", asked every eplb_interval_s as
    # function(summary, num_expert, **expert_shards_policy_args) with the expert load window's summary over
    # eplb_window_s (what /v1/expert-load shows) and the number in force; it returns the number wanted (None: keep).
    # Built in: "latentmoe.cluster.eplb:shards_for_work" (args target_pairs_per_s, min_shards, max_shards)
    expert_shards_policy: str | None = None
    expert_shards_policy_args: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("num_blocks", "cache_bytes", "max_model_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.cache_memory_fraction is not None and not 0 < self.cache_memory_fraction <= 1:
            raise ValueError(f"cache_memory_fraction must be in (0, 1], got {self.cache_memory_fraction}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kernels not in ("auto", "triton", "numba", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton', 'numba' or 'torch', got {self.kernels!r}")
        for name in ("padded_dispatch_tokens", "prefill_threads", "redundant_experts"):
            _non_negative_int(name, getattr(self, name))
        if self.micro_batches not in (0, 1, 2):
            raise ValueError(f"micro_batches must be 0 (by batch size), 1 or 2, got {self.micro_batches!r}")
        for name, low in (("eplb_interval_s", 0.0), ("eplb_window_s", None), ("eplb_threshold", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    (value < low if low is not None else value <= 0):
                raise ValueError(f"{name} must be a finite number {'>= ' + str(low) if low is not None else '> 0'}, "
                                 f"got {value!r}")
        if self.eplb_mode not in ("copies", "repack"):
            raise ValueError(f"eplb_mode must be 'copies' or 'repack', got {self.eplb_mode!r}")
        if self.expert_shards_policy is not None:
            module, _, name = str(self.expert_shards_policy).partition(":")
            if not isinstance(self.expert_shards_policy, str) or not module or not name:
                raise ValueError(f"expert_shards_policy must be 'module:function', got {self.expert_shards_policy!r}")
            if self.eplb_interval_s <= 0:
                raise ValueError("expert_shards_policy is asked every eplb_interval_s: set eplb_interval_s > 0")
        if not isinstance(self.expert_shards_policy_args, dict):
            raise ValueError(f"expert_shards_policy_args must be a mapping, got {self.expert_shards_policy_args!r}")
        if self.prefill_mla not in ("naive", "absorbed"):
            raise ValueError(f"prefill_mla must be 'naive' or 'absorbed', got {self.prefill_mla!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        reject_unknown_keys(cls, d, "engine setting")
        return cls(**d)


def reject_unknown_keys(cls, d: dict[str, Any], what: str) -> None:
    """``ValueError`` naming the keys of ``d`` that are not fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(names)}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
