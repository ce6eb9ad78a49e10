"""`latentmoe make-tiny --config ... [--fp8]` for the V3 family: what it writes is DeepSeek's format and loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from latentmoe.cli import app
from latentmoe.model import load_model
from latentmoe.model.loader import checkpoint_files
from latentmoe.model.tiny import published_config
from tests.model.test_fp8 import dequantize, hf_logits, rel_err, write_plain



def run(*args):
    result = CliRunner().invoke(app, ["make-tiny", *map(str, args)])
    return result


def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for name, file in checkpoint_files(path).items():
        with safe_open(file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_make_tiny_v3_fp8(tmp_path):
    result = run(tmp_path / "v3", "--config", "tiny-v3", "--fp8", "--seed", "4")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "v3" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (config["model_type"], config["topk_method"], config["num_nextn_predict_layers"]) == \
        ("deepseek_v3", "noaux_tc", 1)
    tensors = read_all(tmp_path / "v3")
    assert tensors["model.layers.1.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (1, 2)  # [48, 160]: 1 x 2 blocks
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert "model.layers.3.eh_proj.weight" in tensors and "model.layers.3.enorm.weight" in tensors  # the MTP layer
    assert tensors["model.layers.3.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn

    # transformers on this file's own dequantization of it, MTP layer and scales left out
    plain = {n: (dequantize(t, tensors[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t)
             for n, t in tensors.items() if not n.endswith("_scale_inv") and not n.startswith("model.layers.3.")}
    write_plain(tmp_path / "plain", {k: v for k, v in config.items() if k != "quantization_config"}, plain)
    input_ids = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(5))
    assert rel_err(load_model(tmp_path / "v3")(input_ids), hf_logits(tmp_path / "plain", input_ids)) < 1e-4


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "moonlight"])
def test_make_tiny_from_published_v3_family_configs(tmp_path, name):
    """The published routing and model type, with small widths (a full-size one is 671 B parameters)."""
    cfg = published_config(name) | dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        kv_lora_rank=32,
                                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                        first_k_dense_replace=1, max_position_embeddings=256)
    if cfg["q_lora_rank"]:
        cfg["q_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = run(tmp_path / "out", "--config", tmp_path / "config.json", *(["--fp8"] if name != "moonlight" else []))
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "out", dtype="bfloat16")
    assert model.config.model_type == cfg["model_type"] and model.config.n_group == cfg["n_group"]
    ids = model.model.layers[1].mlp.gate(torch.randn(5, 64))[1]
    assert ids.shape == (5, cfg["num_experts_per_tok"])


def test_make_tiny_names_an_unknown_config(tmp_path):
    result = run(tmp_path / "x", "--config", "deepseek-v9")
    assert result.exit_code != 0 and "deepseek-v9" in result.output
