"""deploy/sizing.py: memory per role from the published configs, cross-checked with the published sizes, and the
table in README.md ("Deploying") kept equal to what it computes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("deploy_sizing", REPO / "deploy" / "sizing.py")
sizing = sys.modules["deploy_sizing"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sizing)


# DeepSeek-V3: 671 B in the main model (the MTP layer's 11.5 B apart), 36.6 B activated with the output head;
# Kimi-K2: 1.04 T total (as its model card rounds it; 1,026 B counted), 32 B activated.
@pytest.mark.parametrize("name,total_b,active_b,total_rel", [
    ("deepseek-v2", 236, 21, 0.005), ("deepseek-v2-lite", 15.7, 2.4, 0.005),
    ("deepseek-v3", 671, 36.6, 0.005), ("kimi-k2", 1040, 32, 0.015)])
def test_parameter_counts_match_the_published_sizes(name, total_b, active_b, total_rel):
    size = sizing.model_size(sizing.published(name))
    assert size.total_params / 1e9 == pytest.approx(total_b, rel=total_rel)
    # "activated" as DeepSeek counts it: the embedding table is a lookup, not a matmul
    assert (size.active_params - size.embedding_params) / 1e9 == pytest.approx(active_b, rel=0.03)


@pytest.mark.parametrize("name,latent_bytes", [("deepseek-v2", 69_120), ("deepseek-v2-lite", 31_104),
                                               ("deepseek-v3", 70_272), ("kimi-k2", 70_272)])
def test_latent_cache_bytes_per_token(name, latent_bytes):
    cfg = sizing.published(name)
    size = sizing.model_size(cfg)
    assert size.latent_cache_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert size.latent_cache_bytes_per_token == latent_bytes


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "kimi-k2"])
def test_shards_add_up_to_the_model(name):
    cfg = sizing.published(name)
    size = sizing.model_size(cfg)
    for shards in (1, 2, 4, 8, 16) + sizing.V3_EXPERT_SHARDS:
        if cfg.n_routed_experts % shards:  # V2's 160 experts over 64 shards: uneven, checked below
            continue
        assert (size.attention_shard_weight_bytes + shards * size.expert_shard_weight_bytes(shards)
                == size.total_params * 2)
    # an uneven split: the largest shard holds the extra experts
    assert size.expert_shard_weight_bytes(3) == -(-cfg.n_routed_experts // 3) * len(cfg.moe_layers) * \
        size.params_per_routed_expert * 2


@pytest.mark.parametrize("arch", ["tiny", "tiny-v3"])
def test_attention_side_against_the_model(tiny_dir, tmp_path, arch):
    """The attention-side count equals the parameters of latentmoe's own model loaded without routed experts
    (V3's: with its e_score_correction_bias)."""
    from latentmoe.model import load_model
    from latentmoe.model.config import ModelConfig
    from latentmoe.model.tiny import TINY_V3_CONFIG, make_tiny

    if arch == "tiny-v3":
        tiny_dir = make_tiny(tmp_path / "v3", config=TINY_V3_CONFIG)
    cfg = ModelConfig.from_json(tiny_dir)
    size = sizing.model_size(cfg, bytes_per_param=4)
    attention = load_model(str(tiny_dir), expert_ids=[])
    full = load_model(str(tiny_dir))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(attention) == size.attention_params
    assert count(full) == size.total_params


def test_deploying_md_has_the_computed_table():
    doc = (REPO / "README.md").read_text()
    stale = "re-run `python deploy/sizing.py` and paste its tables into README.md"
    assert sizing.table(sizing.v2_models()) in doc, stale
    assert sizing.table(sizing.v3_models(), expert_shards=sizing.V3_EXPERT_SHARDS) in doc, stale
