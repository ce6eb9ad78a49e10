"""The built-in tiny model: a DeepSeek-V2-architecture checkpoint with random weights.

It has every feature of the architecture (q_lora, YaRN, a dense first layer,
group-limited routing, shared experts) at a size a CPU answers in milliseconds,
and is written in the Hub format, so everything that loads it would load a real
checkpoint the same way. ``--config`` builds random checkpoints of any shape
(the published DeepSeek-V2 / V2-Lite configs ship in ``configs/``).
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from latentmoe.model.config import ModelConfig
from latentmoe.model.loader import build_model, save_checkpoint

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


def published_config(name: str) -> dict:
    """``deepseek-v2`` or ``deepseek-v2-lite``: the published config.json, as shipped in ``configs/``."""
    text = resources.files("latentmoe.model").joinpath("configs", f"{name}.json").read_text()
    return json.loads(text)


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
        elif "embed_tokens" in name:
            value = noise
        else:
            fan_in = p.shape[-1]
            gain = 4.0 if name == "lm_head.weight" else 2.0 if name.endswith("mlp.gate.weight") else 1.0
            value = noise * gain / fan_in**0.5
        p.copy_(value)


def make_tiny(out_dir: str | Path, seed: int = 0, config: dict | None = None,
              dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None) -> Path:
    """Write a random-weight checkpoint (config, safetensors, tokenizer) to ``out_dir``."""
    from latentmoe.model.tiny_tokenizer import write_tiny_tokenizer

    cfg = ModelConfig.from_dict(config or TINY_CONFIG)
    model = build_model(cfg, dtype=torch.float32)
    init_random(model, seed)
    model.to(dtype)
    out_dir = Path(out_dir)
    save_checkpoint(model, out_dir, max_shard_bytes=max_shard_bytes)
    write_tiny_tokenizer(out_dir)
    return out_dir


def default_model_dir(seed: int = 0) -> Path:
    """The built-in tiny model, written on first use under ``$LATENTMOE_CACHE`` (default ~/.cache/latentmoe)."""
    root = Path(os.environ.get("LATENTMOE_CACHE", Path.home() / ".cache" / "latentmoe"))
    path = root / f"tiny-seed{seed}"
    if not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
        tmp = root / f".tiny-seed{seed}.{os.getpid()}"
        make_tiny(tmp, seed=seed)
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path
