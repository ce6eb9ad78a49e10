"""The model configuration, read from a checkpoint's ``config.json``.

Field names are Hugging Face's, so the dataclass can be held against any published
DeepSeek-V2 or DeepSeek-V3-family config (``model_type`` ``deepseek_v2``, ``deepseek_v3``,
or ``kimi_k2``, which is DeepSeek-V3's architecture under Moonshot's name). Both forms that
exist are accepted: the Hub form (``rope_theta`` + ``rope_scaling: {type: yarn, ...}``) and
the transformers >= 5 form (``rope_parameters: {rope_type: yarn, rope_theta, ...}``; for V3
it drops ``scoring_func`` and ``topk_method``, which then take V3's values). DeepSeek's FP8
checkpoints (``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``)
are accepted and dequantized at load. Settings we do not implement are rejected with a
message that names them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys that only matter for training or for other frameworks: accepted and ignored.
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "attention_dropout", "aux_loss_alpha", "seq_aux",
    "output_router_logits", "router_aux_loss_coef", "pretraining_tp", "pad_token_id",
    "_name_or_path", "head_dim", "qk_head_dim", "ep_size",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tokenizer_class", "generation_config",
}

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
_V3_TYPES = ("deepseek_v3", "kimi_k2")
# DeepSeek's FP8 checkpoints: only the weights are quantized here ("dynamic" activations are a GPU matter).
_QUANT_KEYS = {"quant_method", "weight_block_size", "activation_scheme", "fmt"}

_ROPE_KEYS = {
    "type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
}


@dataclass
class RopeConfig:
    """RoPE over the ``qk_rope_head_dim`` dims, optionally YaRN-scaled."""

    rope_type: str = "default"  # "default" | "yarn"
    rope_theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"unsupported rope type {self.rope_type!r}: latentmoe implements 'default' and 'yarn'")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_type == "yarn":
            if not self.factor >= 1.0:
                raise ValueError(f"rope factor must be >= 1 for yarn, got {self.factor}")
            if self.original_max_position_embeddings is None:
                raise ValueError("yarn rope needs original_max_position_embeddings")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, rope_theta: float | None) -> "RopeConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - _ROPE_KEYS)
        if unknown:
            raise ValueError(f"unsupported rope setting(s) {unknown}")
        rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
        d.pop("type", None)
        if rope_theta is not None:
            d.setdefault("rope_theta", rope_theta)
        # None in a published config means "use the default".
        d = {k: v for k, v in d.items() if v is not None}
        return cls(rope_type=rope_type, **d)

    def yarn_mscale(self, mscale: float) -> float:
        if self.factor <= 1:
            return 1.0
        return 0.1 * mscale * math.log(self.factor) + 1.0


@dataclass
class ModelConfig:
    """DeepSeek-V2/V3 architecture (HF field names). Defaults are DeepSeek-V2-Lite's where HF has none."""

    model_type: str = "deepseek_v2"
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"  # "softmax" (V2) | "sigmoid" (V3, with noaux_tc)
    # DeepSeek-V3: multi-token-prediction layers after the last layer (in the checkpoint, not served)
    num_nextn_predict_layers: int = 0
    quantization_config: dict | None = None  # DeepSeek's block FP8, dequantized at load
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} != num_attention_heads={self.num_attention_heads}: "
                "MLA has no grouped KV heads"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: latentmoe implements 'silu'")
        if self.attention_bias:
            raise ValueError("unsupported attention_bias: true (DeepSeek-V2 has no attention biases)")
        if self.mlp_bias:
            raise ValueError("unsupported mlp_bias: true (DeepSeek-V2 has no MLP biases)")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}: latentmoe serves {', '.join(MODEL_TYPES)}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}: latentmoe implements 'softmax' "
                             "(DeepSeek-V2) and 'sigmoid' (DeepSeek-V3)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unsupported topk_method {self.topk_method!r}: latentmoe implements 'greedy', "
                             "'group_limited_greedy' (DeepSeek-V2) and 'noaux_tc' (DeepSeek-V3)")
        if (self.scoring_func == "sigmoid") != (self.topk_method == "noaux_tc"):
            raise ValueError(
                f"unsupported scoring_func {self.scoring_func!r} with topk_method {self.topk_method!r}: latentmoe "
                "implements softmax with greedy / group_limited_greedy (DeepSeek-V2) and sigmoid with noaux_tc "
                "(DeepSeek-V3)")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers must be a non-negative integer, "
                             f"got {self.num_nextn_predict_layers!r}")
        self._check_quantization()
        if self.n_routed_experts is None:
            # A dense model: every layer has the dense MLP.
            self.first_k_dense_replace = self.num_hidden_layers
            return
        if not self.num_experts_per_tok or not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} is outside [0, num_hidden_layers]")
        if self.topk_method == "noaux_tc" and self.n_group is None:
            self.n_group, self.topk_group = 1, self.topk_group or 1
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if not self.n_group or self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"{self.topk_method} needs n_group dividing n_routed_experts={self.n_routed_experts}, "
                    f"got n_group={self.n_group}"
                )
            if self.topk_method == "noaux_tc" and self.experts_per_group < 2:
                raise ValueError(f"noaux_tc ranks groups by their two best experts: n_group={self.n_group} leaves "
                                 f"{self.experts_per_group} expert per group")
            if not self.topk_group or not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.topk_group * self.experts_per_group < self.num_experts_per_tok:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {self.experts_per_group} experts cannot hold "
                    f"num_experts_per_tok={self.num_experts_per_tok}"
                )

    def _check_quantization(self) -> None:
        q = self.quantization_config
        if q is None:
            return
        if not isinstance(q, dict):
            raise ValueError(f"quantization_config must be a mapping, got {q!r}")
        unknown = sorted(set(q) - _QUANT_KEYS)
        if unknown:
            raise ValueError(f"unsupported quantization_config key(s) {unknown}")
        if q.get("quant_method") != "fp8":
            raise ValueError(f"unsupported quantization_config quant_method {q.get('quant_method')!r}: latentmoe "
                             "loads DeepSeek's block FP8 ('fp8')")
        block = q.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"quantization_config weight_block_size must be two positive integers "
                             f"(DeepSeek's: [128, 128]), got {block!r}")
        if q.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"unsupported quantization_config fmt {q['fmt']!r}: latentmoe reads float8 e4m3")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"unsupported quantization_config activation_scheme {q['activation_scheme']!r}: "
                             "DeepSeek's checkpoints use 'dynamic'")

    # ---- derived ------------------------------------------------------------------------------------------------

    @property
    def is_v3(self) -> bool:
        """DeepSeek-V3's architecture (V3, R1, Kimi-K2, Moonlight)."""
        return self.model_type in _V3_TYPES

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of a weight's FP8 scale block, when the checkpoint is DeepSeek's FP8."""
        if self.quantization_config is None:
            return None
        rows, cols = self.quantization_config["weight_block_size"]
        return rows, cols

    @property
    def group_limited(self) -> bool:
        """Tokens choose experts within ``topk_group`` of ``n_group`` groups (so whole groups per device bound
        the devices a token reaches). False for plain greedy routing and for a single group."""
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and (self.n_group or 1) > 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: ``[c_kv | k_pe]``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // (self.n_group or 1)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = self.rope.yarn_mscale(self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE after the first ``first_k_dense_replace`` layers, every ``moe_layer_freq``-th."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def mha_cache_values_per_token(self) -> int:
        """What an MHA model with the same heads would cache per token per layer (paper's Table 1 convention)."""
        return 2 * self.num_attention_heads * self.v_head_dim

    # ---- I/O ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.setdefault("model_type", "deepseek_v2")
        if d["model_type"] not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {d['model_type']!r}: latentmoe serves {', '.join(MODEL_TYPES)}")
        if d["model_type"] in _V3_TYPES:
            # transformers >= 5 writes V3 configs without these: its DeepseekV3 always routes this way
            for key, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("norm_topk_prob", True)):
                if d.get(key) is None:
                    d[key] = value
        if d.pop("rope_interleave", True) is not True:
            raise ValueError("unsupported rope_interleave: false (DeepSeek rotates interleaved pairs)")
        rope_scaling = d.pop("rope_scaling", None)
        rope_parameters = d.pop("rope_parameters", None)
        rope_theta = d.pop("rope_theta", None)
        if rope_scaling and rope_parameters:
            raise ValueError("config has both rope_scaling (Hub form) and rope_parameters (transformers>=5 form)")
        rope = RopeConfig.from_dict(rope_scaling or rope_parameters, rope_theta)
        names = {f.name for f in dataclasses.fields(cls)} - {"rope"}
        unknown = sorted(k for k in d if k not in names and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unsupported config key(s) {unknown}")
        kwargs = {k: v for k, v in d.items() if k in names}
        # null in a published config means "use the default" for these
        for key in ("moe_layer_freq", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob",
                    "num_nextn_predict_layers"):
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]
        return cls(rope=rope, **kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hub_dict(self) -> dict[str, Any]:
        """The Hub form of ``config.json`` (``rope_scaling`` with ``type``), as published checkpoints have it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope"}
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.is_v3 else "DeepseekV2ForCausalLM"]
        if self.quantization_config is None:
            del d["quantization_config"]
        if not self.is_v3 and not self.num_nextn_predict_layers:
            del d["num_nextn_predict_layers"]
        d["rope_theta"] = self.rope.rope_theta
        if self.rope.rope_type == "yarn":
            r = self.rope
            d["rope_scaling"] = {
                "type": "yarn", "factor": r.factor, "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
            }
        else:
            d["rope_scaling"] = None
        return d
