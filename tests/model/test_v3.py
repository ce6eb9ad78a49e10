"""DeepSeek-V3's architecture (V3/R1, Kimi-K2, Moonlight) against Hugging Face transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import copy
import json
import logging
import zlib

import pytest
import torch

from latentmoe.model import ModelConfig, build_model, load_model, save_checkpoint
from latentmoe.model.tiny import TINY_V3_CONFIG, init_random, make_tiny, published_config, write_mtp_layers

import transformers  # noqa: E402 (a test dependency: the reference, never skipped)


def small_v3(**overrides) -> dict:
    cfg = copy.deepcopy(TINY_V3_CONFIG)
    cfg.update(vocab_size=256, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
               num_attention_heads=3, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
               num_nextn_predict_layers=0,
               rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None or k in ("q_lora_rank", "rope_scaling")}


def write_checkpoint(path, cfg: dict, seed: int = 0, max_shard_bytes=None):
    model = build_model(ModelConfig.from_dict(cfg))
    init_random(model, seed)
    save_checkpoint(model, path, max_shard_bytes=max_shard_bytes)
    if model.config.num_nextn_predict_layers:
        write_mtp_layers(path, model.config, seed, torch.float32)
    return path


def hf_logits(path, input_ids):
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf.eval()(input_ids).logits.float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {
    # 4 groups of 4, top-2 groups: V3's routing; q_lora, a dense first layer, YaRN (original context 16)
    "groups": dict(),
    "groups_of_two_top1": dict(n_group=8, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=4.0),
    "one_group": dict(n_group=1, topk_group=1, routed_scaling_factor=2.827),  # Kimi-K2 / Moonlight
    "norm_off": dict(norm_topk_prob=False, routed_scaling_factor=1.5),
    "no_q_lora_all_moe_no_yarn": dict(q_lora_rank=None, first_k_dense_replace=0, rope_scaling=None,
                                      rope_theta=50000.0),
    "dense_first_two": dict(first_k_dense_replace=2, num_hidden_layers=4),
    "mtp_layer": dict(num_nextn_predict_layers=1),
    "sharded": dict(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    cfg = small_v3(**CASES[case])
    path = write_checkpoint(tmp_path, cfg, seed=zlib.crc32(case.encode()) % 1000,
                            max_shard_bytes=60_000 if case == "sharded" else None)
    if case == "sharded":
        assert len(list(path.glob("model-*.safetensors"))) > 3
    input_ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))  # past 16
    model = load_model(path)
    assert model.model.layers[-1].mlp.gate.e_score_correction_bias.abs().sum() > 0  # a real, nonzero bias
    ours = model(input_ids)
    ref = hf_logits(path, input_ids)
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_the_bias_chooses_and_does_not_weigh(tmp_path):
    """e_score_correction_bias changes which experts are chosen (the logits move when it is zeroed), and is not in
    the weights: a bias that is the same for every expert changes nothing."""
    path = write_checkpoint(tmp_path, small_v3(), seed=11)
    input_ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    model = load_model(path)
    biased = model(input_ids)
    gates = [layer.mlp.gate for layer in model.model.layers if layer.is_moe]
    saved = [g.e_score_correction_bias.data.clone() for g in gates]
    for g in gates:
        g.e_score_correction_bias.data += 7.0
    assert rel_err(model(input_ids), biased) < 1e-6
    for g in gates:
        g.e_score_correction_bias.data.zero_()
    assert rel_err(model(input_ids), biased) > 1e-3
    for g, b in zip(gates, saved):
        g.e_score_correction_bias.data.copy_(b)


def test_noaux_tc_by_hand():
    """Two groups of two; the bias moves the choice to group 1, whose weights are its unbiased sigmoid scores."""
    cfg = ModelConfig.from_dict(small_v3(hidden_size=2, n_routed_experts=4, n_group=2, topk_group=1,
                                         num_experts_per_tok=2, routed_scaling_factor=2.0))
    model = build_model(cfg)
    gate = model.model.layers[1].mlp.gate
    gate.weight.data = torch.tensor([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    gate.e_score_correction_bias.data = torch.tensor([0.0, 0.0, 0.0, 3.0])
    weights, ids = gate(torch.tensor([[1.0, 0.0]]))
    # biased: group 0 = s(4) + s(3) ~ 1.93, group 1 = s(2) + s(1) + 3 ~ 4.61: group 1 wins, experts 3 then 2
    assert ids.tolist() == [[3, 2]]
    s = torch.sigmoid(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(weights[0], s / s.sum() * 2.0)


def test_transformers_5_config_form(tmp_path):
    """The config transformers >= 5 writes for V3 (rope_parameters, no scoring_func / topk_method / moe_layer_freq)
    is the same model as the Hub form."""
    import inspect

    cfg = small_v3()
    path = write_checkpoint(tmp_path / "hub", cfg, seed=4)
    known = set(inspect.signature(transformers.DeepseekV3Config.__init__).parameters)
    hub = json.loads((path / "config.json").read_text())
    rope = dict(hub["rope_scaling"], rope_type=hub["rope_scaling"]["type"], rope_theta=hub["rope_theta"])
    fresh = transformers.DeepseekV3Config(**{k: v for k, v in hub.items() if k in known}, rope_parameters=rope,
                                          num_nextn_predict_layers=hub["num_nextn_predict_layers"])
    fresh.save_pretrained(tmp_path / "v5")
    v5 = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "scoring_func" not in v5 and "topk_method" not in v5 and "rope_scaling" not in v5, sorted(v5)
    assert v5["rope_parameters"]["rope_type"] == "yarn"
    assert ModelConfig.from_dict(v5) == ModelConfig.from_json(path)


def test_mtp_layer_is_skipped_and_said_once(tmp_path, caplog):
    cfg = small_v3(num_nextn_predict_layers=1)
    path = write_checkpoint(tmp_path, cfg, seed=5)
    files = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = [n for n in files if n.startswith(f"model.layers.{cfg['num_hidden_layers']}.")]
    assert len(mtp) > 20 and any("eh_proj" in n for n in mtp)
    with caplog.at_level(logging.INFO, logger="latentmoe.model.loader"):
        model = load_model(path)
    records = [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(records) == 1 and f"{len(mtp)} tensors" in records[0].getMessage()
    assert len(model.model.layers) == cfg["num_hidden_layers"]
    # without num_nextn_predict_layers the same tensors are unexpected
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match=rf"unexpected tensor.*model\.layers\.{cfg['num_hidden_layers']}\."):
        load_model(path)


def test_bfloat16_keeps_the_router_in_float32(tmp_path):
    path = write_checkpoint(tmp_path, small_v3(), seed=6)
    model = load_model(path, dtype="bfloat16")
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    input_ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    assert rel_err(model(input_ids), load_model(path)(input_ids)) < 5e-2


def test_published_configs_parse():
    v3 = ModelConfig.from_dict(published_config("deepseek-v3"))
    k2 = ModelConfig.from_dict(published_config("kimi-k2"))
    moon = ModelConfig.from_dict(published_config("moonlight"))
    assert (v3.n_routed_experts, v3.n_group, v3.topk_group, v3.num_experts_per_tok) == (256, 8, 4, 8)
    assert (v3.scoring_func, v3.topk_method, v3.routed_scaling_factor, v3.norm_topk_prob) == \
        ("sigmoid", "noaux_tc", 2.5, True)
    assert v3.fp8_block_size == (128, 128) and v3.num_nextn_predict_layers == 1 and v3.first_k_dense_replace == 3
    assert v3.latent_dim * v3.num_hidden_layers * 2 == 70_272  # DESIGN §5
    assert (k2.model_type, k2.n_routed_experts, k2.n_group, k2.num_attention_heads) == ("kimi_k2", 384, 1, 64)
    assert k2.fp8_block_size == (128, 128) and not k2.group_limited
    assert (moon.n_routed_experts, moon.q_lora_rank, moon.fp8_block_size, moon.n_group) == (64, None, None, 1)
    # transformers reads the same published files into the same architecture
    for name in ("deepseek-v3", "moonlight"):
        hf = transformers.DeepseekV3Config.from_dict(published_config(name)).to_dict()
        ours = ModelConfig.from_dict(published_config(name))
        assert ModelConfig.from_dict({k: v for k, v in hf.items() if k != "quantization_config"}
                                     | {"quantization_config": ours.quantization_config}) == ours


@pytest.mark.parametrize("override,message", [
    ({"rope_interleave": False}, "rope_interleave"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' with topk_method 'noaux_tc'"),
    ({"n_group": 16, "topk_group": 4}, "two best experts"),
    ({"n_group": 3}, "n_group dividing"),
    ({"topk_group": 5}, "topk_group"),
    ({"model_type": "deepseek_v4"}, "model_type 'deepseek_v4'"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "weight_block_size"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}}, "fmt 'e5m2'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128], "x": 1}}, r"key\(s\) \['x'\]"),
])
def test_unsupported_v3_settings_are_rejected_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(small_v3(**override))


def test_make_tiny_v3_is_v3(tmp_path):
    path = make_tiny(tmp_path / "v3", seed=2, config=TINY_V3_CONFIG)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    input_ids = torch.randint(0, 1024, (1, 20), generator=torch.Generator().manual_seed(8))
    assert rel_err(load_model(path)(input_ids), hf_logits(path, input_ids)) < 1e-4
