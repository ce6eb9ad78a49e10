"""How much GPU memory each role needs, computed from a model's ``config.json``.

An attention shard holds everything except the routed experts (embedding, MLA, gate,
shared experts, dense layers, lm_head) plus the latent cache of its requests; an expert
shard holds ``1/E`` of the routed experts and no per-request state.

    .venv/bin/python deploy/sizing.py                       # the tables in README.md ("Deploying")
    .venv/bin/python deploy/sizing.py path/to/config.json   # any DeepSeek-V2/V3-family checkpoint

Bytes are bf16's, the serving dtype: DeepSeek-V3 and Kimi-K2 ship in FP8, which latentmoe
dequantizes at load, so a shard holds twice its weights' bytes on disk. V3's multi-token-
prediction layer is skipped at load and not counted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from latentmoe.model.config import ModelConfig

CONFIGS = Path(__file__).resolve().parent.parent / "latentmoe" / "model" / "configs"
GIB = 1024 ** 3


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts by where they live; bytes at ``bytes_per_param`` (2 for bf16)."""

    attention_params: int  # everything but the routed experts: one full copy per attention shard
    routed_expert_params: int  # all routed experts of all MoE layers, split over the expert shards
    params_per_routed_expert: int  # one expert of one layer (gate, up and down projections)
    num_routed_experts: int  # per MoE layer
    num_moe_layers: int
    active_params: int  # attention side + num_experts_per_tok experts per MoE layer
    embedding_params: int  # the input embedding table (a lookup, left out of "activated" counts)
    latent_values_per_token: int  # [c_kv | k_pe] over all layers
    bytes_per_param: int = 2

    @property
    def total_params(self) -> int:
        return self.attention_params + self.routed_expert_params

    @property
    def attention_shard_weight_bytes(self) -> int:
        return self.attention_params * self.bytes_per_param

    def expert_shard_weight_bytes(self, num_expert_shards: int) -> int:
        """The largest shard's bytes: whole experts, ``ceil(n_routed_experts / E)`` of them per MoE layer."""
        experts = -(-self.num_routed_experts // num_expert_shards)
        return experts * self.num_moe_layers * self.params_per_routed_expert * self.bytes_per_param

    @property
    def latent_cache_bytes_per_token(self) -> int:
        return self.latent_values_per_token * self.bytes_per_param

    def cache_tokens_per_attention_shard(self, gpu_bytes: int, usable_fraction: float = 0.9) -> int:
        """Tokens of latent cache that fit next to the attention weights on one GPU."""
        free = int(gpu_bytes * usable_fraction) - self.attention_shard_weight_bytes
        return max(free, 0) // self.latent_cache_bytes_per_token


def model_size(cfg: ModelConfig, bytes_per_param: int = 2) -> ModelSize:
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    heads, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    # MLA: queries (optionally through the q LoRA), the shared latent [c_kv | k_pe], its up-projection, the output.
    if cfg.q_lora_rank:
        q = H * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * qk  # q_a_proj, q_a_layernorm, q_b_proj
    else:
        q = H * heads * qk  # q_proj
    kv = H * cfg.latent_dim + cfg.kv_lora_rank + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + v)
    attention = q + kv + heads * v * H  # ... + o_proj
    per_layer_norms = 2 * H  # input_layernorm, post_attention_layernorm
    dense_mlp = 3 * H * cfg.intermediate_size  # gate_proj, up_proj, down_proj
    num_moe = len(cfg.moe_layers)
    expert = 3 * H * cfg.moe_intermediate_size
    routed = (cfg.n_routed_experts or 0) * expert
    bias = (cfg.n_routed_experts or 0) if cfg.topk_method == "noaux_tc" else 0  # V3's e_score_correction_bias
    moe_attention_side = (cfg.n_routed_experts or 0) * H + bias + (cfg.n_shared_experts or 0) * expert  # gate, shared
    embedding = V * H
    attention_params = (
        embedding + V * H + H  # embed_tokens, lm_head, final norm
        + L * (attention + per_layer_norms)
        + (L - num_moe) * dense_mlp
        + num_moe * moe_attention_side
    )
    active = attention_params + num_moe * (cfg.num_experts_per_tok or 0) * expert
    return ModelSize(
        attention_params=attention_params,
        routed_expert_params=num_moe * routed,
        params_per_routed_expert=expert,
        num_routed_experts=cfg.n_routed_experts or 0,
        num_moe_layers=num_moe,
        active_params=active,
        embedding_params=embedding,
        latent_values_per_token=cfg.latent_dim * L,
        bytes_per_param=bytes_per_param,
    )


def published(name: str) -> ModelConfig:
    """A published config shipped in the package: ``deepseek-v2``, ``deepseek-v2-lite``, ``deepseek-v3``,
    ``kimi-k2`` or ``moonlight``."""
    return ModelConfig.from_dict(json.loads((CONFIGS / f"{name}.json").read_text()))


def v2_models() -> dict[str, ModelConfig]:
    return {"DeepSeek-V2-Lite": published("deepseek-v2-lite"), "DeepSeek-V2": published("deepseek-v2")}


def v3_models() -> dict[str, ModelConfig]:
    return {"DeepSeek-V3": published("deepseek-v3"), "Kimi-K2": published("kimi-k2")}


V3_EXPERT_SHARDS = (8, 16, 32, 64)


def table(models: dict[str, ModelConfig], expert_shards=(1, 2, 4, 8, 16), gpu_gib: int = 80) -> str:
    """The Markdown table of README.md ("Deploying")."""
    cols = list(models)
    sizes = {name: model_size(cfg) for name, cfg in models.items()}
    rows = [
        ("total parameters", lambda s: f"{s.total_params / 1e9:.2f} B"),
        ("activated per token (without the embedding table)",
         lambda s: f"{(s.active_params - s.embedding_params) / 1e9:.2f} B"),
        ("routed experts (all MoE layers)", lambda s: f"{s.routed_expert_params / 1e9:.2f} B"),
        ("**attention shard weights** (bf16)", lambda s: f"**{s.attention_shard_weight_bytes / GIB:.1f} GiB**"),
        *[(f"**expert shard weights**, E = {e} (bf16)",
           (lambda e: lambda s: f"**{s.expert_shard_weight_bytes(e) / GIB:.1f} GiB**")(e)) for e in expert_shards],
        ("**latent cache per token** (bf16)", lambda s: f"**{s.latent_cache_bytes_per_token:,} B**"),
        (f"cache tokens per attention shard on a {gpu_gib} GiB GPU (90 % usable)",
         lambda s: f"{s.cache_tokens_per_attention_shard(gpu_gib * GIB):,}"),
    ]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(fmt(sizes[c]) for c in cols) + " |" for label, fmt in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv:
        models = {Path(p).parent.name or p: ModelConfig.from_json(p) for p in argv}
        print(table(models))
        return
    print(table(v2_models()))
    print()
    print(table(v3_models(), expert_shards=V3_EXPERT_SHARDS))


if __name__ == "__main__":
    main(sys.argv[1:])
