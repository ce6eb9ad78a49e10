"""The built-in tiny models: DeepSeek-V2- and V3-architecture checkpoints with random weights.

``TINY_CONFIG`` has every feature of V2 (q_lora, YaRN, a dense first layer,
group-limited routing, shared experts), ``TINY_V3_CONFIG`` those of V3 (sigmoid
``noaux_tc`` routing over groups with ``e_score_correction_bias``, a multi-token-prediction
layer in the checkpoint), at a size a CPU answers in milliseconds. Both are written in the
Hub format (and V3 in DeepSeek's FP8 on request), so everything that loads them would load
a real checkpoint the same way. ``--config`` builds random checkpoints of any shape: the
published DeepSeek-V2, V2-Lite, V3, Kimi-K2 and Moonlight configs ship in ``configs/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from latentmoe.model.config import ModelConfig
from latentmoe.model.loader import build_model, save_checkpoint
from latentmoe.paths import cache_root

TINY_CONFIG = {
    "model_type": "deepseek_v2",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "num_experts_per_tok": 4,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


# DeepSeek-V3's architecture, small: 4 groups of 4 experts, top-2 groups, top-4 experts, sigmoid + bias.
TINY_V3_CONFIG = {
    **{k: v for k, v in TINY_CONFIG.items() if k != "rope_scaling"},
    "model_type": "deepseek_v3",
    "hidden_size": 160,  # so FP8 weights span whole and partial 128 x 128 blocks
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "n_shared_experts": 1,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    },
}

TINY_CONFIGS = {"tiny": TINY_CONFIG, "tiny-v3": TINY_V3_CONFIG}
PUBLISHED = ("deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "kimi-k2", "moonlight")


def published_config(name: str) -> dict:
    """A published config.json, as shipped in ``configs/``: one of ``PUBLISHED``."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published config {name!r}: choose one of {', '.join(PUBLISHED)}")
    text = resources.files("latentmoe.model").joinpath("configs", f"{name}.json").read_text()
    return json.loads(text)


def named_config(name: str) -> dict:
    """``tiny``, ``tiny-v3`` or a published config's name."""
    if name in TINY_CONFIGS:
        return dict(TINY_CONFIGS[name])
    return published_config(name)


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights, scaled so activations and logits stay O(1) and routing is decisive."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith("e_score_correction_bias"):
            value = 0.5 * noise  # about the spread of the sigmoid scores: it changes which experts are chosen
        elif "embed_tokens" in name:
            value = noise
        else:
            fan_in = p.shape[-1]
            gain = 4.0 if name == "lm_head.weight" else 2.0 if name.endswith("mlp.gate.weight") else 1.0
            value = noise * gain / fan_in**0.5
        p.copy_(value)


@torch.no_grad()
def skew_routing(model: torch.nn.Module, hot_experts: Sequence[int], strength: float, seed: int) -> None:
    """Skewed expert load, as trained DeepSeek models have it: every token's hidden state gets a shared direction
    ``u`` (added to every embedding row), and the gate rows of ``hot_experts`` lean towards it in every MoE layer,
    so those experts win for most tokens. ``strength`` scales the lean (0: no skew)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    embed = model.model.embed_tokens.weight
    u = torch.randn(embed.shape[1], generator=gen)
    u = u / u.norm()
    embed += 0.5 * embed.norm(dim=1).mean() * u  # a shared component half a row's own size
    for layer in model.model.layers:
        if getattr(layer, "is_moe", False):
            gate = layer.mlp.gate.weight  # [E, D]
            direction = u * layer.post_attention_layernorm.weight.float()  # u as the gate sees it after the norm
            direction = direction / direction.norm()
            gate[list(hot_experts)] += strength * gate.norm(dim=1).mean() * direction


def make_tiny(out_dir: str | Path, seed: int = 0, config: dict | None = None,
              dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None, *,
              fp8_block_size: tuple[int, int] | None = None, hot_experts: Sequence[int] = (),
              skew: float = 0.0) -> Path:
    """Write a random-weight checkpoint (config, safetensors, tokenizer) to ``out_dir``.

    ``fp8_block_size`` (DeepSeek's: ``(128, 128)``) writes the linear weights in DeepSeek's block FP8. A config
    with ``num_nextn_predict_layers`` gets random multi-token-prediction layers too, as DeepSeek-V3's
    checkpoints have them (loaders skip them). ``hot_experts`` and ``skew``: routing skewed towards those
    experts (``skew_routing``), for the expert load balancing tests and benchmarks.
    """
    from latentmoe.model.tiny_tokenizer import write_tiny_tokenizer

    cfg = ModelConfig.from_dict(config or TINY_CONFIG)
    model = build_model(cfg, dtype=torch.float32)
    init_random(model, seed)
    if hot_experts and skew:
        skew_routing(model, hot_experts, skew, seed)
    model.to(dtype)
    out_dir = Path(out_dir)
    save_checkpoint(model, out_dir, max_shard_bytes=max_shard_bytes, fp8_block_size=fp8_block_size)
    if cfg.num_nextn_predict_layers:
        write_mtp_layers(out_dir, cfg, seed, dtype, fp8_block_size)
    write_tiny_tokenizer(out_dir)
    return out_dir


@torch.no_grad()
def write_mtp_layers(out_dir: Path, cfg: ModelConfig, seed: int, dtype: torch.dtype,
                     fp8_block_size: tuple[int, int] | None = None) -> None:
    """Add DeepSeek-V3's multi-token-prediction layers to a written checkpoint, in a file of their own (as the
    published checkpoints do): a whole decoder layer plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head``."""
    from safetensors.torch import save_file

    from latentmoe.model import fp8
    from latentmoe.model.loader import iter_hub_tensors

    gen = torch.Generator().manual_seed(seed + 1)
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    block = build_model(dataclasses.replace(cfg, num_hidden_layers=1, first_k_dense_replace=0,
                                            num_nextn_predict_layers=0), dtype=torch.float32)
    init_random(block, seed + 1)
    tensors = {}
    for i in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{L + i}."
        extra = {"enorm.weight": torch.ones(D), "hnorm.weight": torch.ones(D),
                 "eh_proj.weight": torch.randn(D, 2 * D, generator=gen) / (2 * D) ** 0.5,
                 "shared_head.norm.weight": torch.ones(D),
                 "shared_head.head.weight": torch.randn(cfg.vocab_size, D, generator=gen) / D ** 0.5,
                 "embed_tokens.weight": torch.randn(cfg.vocab_size, D, generator=gen)}
        layer = {n.removeprefix("model.layers.0."): t for n, t in iter_hub_tensors(block)
                 if n.startswith("model.layers.0.")}
        for name, t in (layer | extra).items():
            t = t.to(dtype)
            if fp8_block_size is not None and fp8.is_quantized_name(name):
                t, scale = fp8.quantize(t, fp8_block_size)
                tensors[prefix + name + fp8.SCALE_SUFFIX] = scale
            tensors[prefix + name] = t.contiguous().clone()
    file = "model-mtp.safetensors"
    save_file(tensors, out_dir / file, metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
    else:  # one file so far: index both
        from safetensors import safe_open

        with safe_open(out_dir / "model.safetensors", framework="pt") as f:
            data = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in f.keys()}}
    data["weight_map"].update({n: file for n in tensors})
    index.write_text(json.dumps(data, indent=2))


def cached_tiny(name: str, **make_tiny_args) -> Path:
    """``make_tiny(**make_tiny_args)`` written once under ``$LATENTMOE_CACHE/name`` (default ~/.cache/latentmoe):
    into a temporary directory first, then renamed, so concurrent first uses never see half a checkpoint."""
    root = cache_root()
    path = root / name
    if not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.{os.getpid()}"
        make_tiny(tmp, **make_tiny_args)
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_model_dir(seed: int = 0) -> Path:
    """The built-in tiny model, written on first use under ``$LATENTMOE_CACHE`` (default ~/.cache/latentmoe)."""
    return cached_tiny(f"tiny-seed{seed}", seed=seed)
