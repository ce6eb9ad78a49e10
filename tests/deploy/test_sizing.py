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


@pytest.mark.parametrize("name,total_b,active_b", [("deepseek-v2", 236, 21), ("deepseek-v2-lite", 15.7, 2.4)])
def test_parameter_counts_match_the_published_sizes(name, total_b, active_b):
    size = sizing.model_size(sizing.published(name))
    assert size.total_params / 1e9 == pytest.approx(total_b, rel=0.005)
    # "activated" as DeepSeek counts it: the embedding table is a lookup, not a matmul
    assert (size.active_params - size.embedding_params) / 1e9 == pytest.approx(active_b, rel=0.03)


@pytest.mark.parametrize("name,latent_bytes", [("deepseek-v2", 69_120), ("deepseek-v2-lite", 31_104)])
def test_latent_cache_bytes_per_token(name, latent_bytes):
    cfg = sizing.published(name)
    size = sizing.model_size(cfg)
    assert size.latent_cache_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert size.latent_cache_bytes_per_token == latent_bytes


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite"])
def test_shards_add_up_to_the_model(name):
    cfg = sizing.published(name)
    size = sizing.model_size(cfg)
    for shards in (1, 2, 4, 8, 16):
        assert cfg.n_routed_experts % shards == 0
        assert (size.attention_shard_weight_bytes + shards * size.expert_shard_weight_bytes(shards)
                == size.total_params * 2)
    # an uneven split: the largest shard holds the extra experts
    assert size.expert_shard_weight_bytes(3) == -(-cfg.n_routed_experts // 3) * len(cfg.moe_layers) * \
        size.params_per_routed_expert * 2


def test_attention_side_against_the_model(tiny_dir):
    """The attention-side count equals the parameters of latentmoe's own model loaded without routed experts."""
    from latentmoe.model import load_model
    from latentmoe.model.config import ModelConfig

    cfg = ModelConfig.from_json(tiny_dir)
    size = sizing.model_size(cfg, bytes_per_param=4)
    attention = load_model(str(tiny_dir), expert_ids=[])
    full = load_model(str(tiny_dir))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(attention) == size.attention_params
    assert count(full) == size.total_params


def test_deploying_md_has_the_computed_table():
    doc = (REPO / "README.md").read_text()
    models = {"DeepSeek-V2-Lite": sizing.published("deepseek-v2-lite"), "DeepSeek-V2": sizing.published("deepseek-v2")}
    assert sizing.table(models) in doc, "re-run `python deploy/sizing.py` and paste its table into README.md"
