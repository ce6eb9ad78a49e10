"""The model against Hugging Face transformers' DeepseekV2ForCausalLM, loaded from the same directory."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import transformers  # the reference: a test dependency, so a missing one fails rather than skips

from latentmoe.model import ModelConfig, build_model, load_model, save_checkpoint
from latentmoe.model.tiny import TINY_CONFIG, init_random


def small_config(**overrides) -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(vocab_size=256, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
               num_attention_heads=3, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
    cfg.update(overrides)
    return cfg


def write_checkpoint(path, cfg: dict, seed: int = 0, max_shard_bytes=None):
    model = build_model(ModelConfig.from_dict(cfg))
    init_random(model, seed)
    save_checkpoint(model, path, max_shard_bytes=max_shard_bytes)
    return path


def hf_logits(path, input_ids, renormalize_topk: bool = False):
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    if renormalize_topk:
        # transformers 5 ignores norm_topk_prob; DeepSeek-V2's own modeling code renormalises the top-k
        # weights instead of scaling them. Apply that rule on top of HF's router (see the test below).
        for layer in hf.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None:
                continue
            original = gate.forward

            def forward(h, _orig=original, _gate=gate):
                logits, w, ids = _orig(h)
                w = w / _gate.routed_scaling_factor
                return logits, w / (w.sum(-1, keepdim=True) + 1e-20), ids

            gate.forward = forward
    with torch.no_grad():
        return hf(input_ids).logits.float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {
    "tiny": dict(),
    "no_q_lora_greedy": dict(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None),
    "group_limited_m1": dict(n_group=8, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=16.0),
    "dense_first_two": dict(first_k_dense_replace=2, num_hidden_layers=4),
    "all_moe_no_yarn": dict(first_k_dense_replace=0, rope_scaling=None, rope_theta=500.0),
    "yarn_short_original": dict(rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                              "mscale_all_dim": 0.8}),
    "rope_parameters_form": dict(rope_scaling=None, rope_theta=None,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                  "original_max_position_embeddings": 32, "beta_fast": 32,
                                                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    cfg = small_config(**CASES[case])
    cfg = {k: v for k, v in cfg.items() if v is not None or k in ("q_lora_rank", "rope_scaling")}
    path = write_checkpoint(tmp_path, cfg, seed=zlib.crc32(case.encode()) % 1000)
    # Longer than original_max_position_embeddings where YaRN is on (16 or 32 in these cases).
    input_ids = torch.randint(0, cfg["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(1))
    ours = load_model(path)(input_ids)
    ref = hf_logits(path, input_ids)
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_norm_topk_prob_follows_deepseek(tmp_path):
    """norm_topk_prob=True renormalises the top-k weights (DeepSeek-V2's rule). transformers 5 ignores the
    flag, so the reference is HF's model with DeepSeek's renormalisation applied to its router."""
    cfg = small_config(norm_topk_prob=True, routed_scaling_factor=3.0)
    path = write_checkpoint(tmp_path, cfg, seed=5)
    input_ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    ours = load_model(path)(input_ids)
    assert rel_err(ours, hf_logits(path, input_ids, renormalize_topk=True)) < 1e-4
    # ...and the flag really changes the model (HF as shipped scales instead).
    assert rel_err(ours, hf_logits(path, input_ids)) > 1e-3


def test_sharded_checkpoint_matches_transformers(tmp_path):
    cfg = small_config()
    path = write_checkpoint(tmp_path, cfg, seed=3, max_shard_bytes=60_000)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 3
    input_ids = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(3))
    assert rel_err(load_model(path)(input_ids), hf_logits(path, input_ids)) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_absorbed_equals_naive(tiny_dir, dtype, tol):
    model = load_model(tiny_dir, dtype=dtype)
    input_ids = torch.randint(0, 1024, (2, 90), generator=torch.Generator().manual_seed(4))
    naive = model(input_ids)
    model.absorbed = True
    absorbed = model(input_ids)
    assert rel_err(absorbed, naive) < tol


def test_bfloat16_close_to_float32(tiny_dir):
    input_ids = torch.randint(0, 1024, (1, 50), generator=torch.Generator().manual_seed(5))
    full = load_model(tiny_dir)(input_ids)
    half = load_model(tiny_dir, dtype="bfloat16")(input_ids)
    assert half.dtype == torch.float32  # logits come out in float32
    assert rel_err(half, full) < 5e-2


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def test_attention_plus_disjoint_expert_loads_equal_whole_model(tiny_dir):
    whole = load_model(tiny_dir)
    n = whole.config.n_routed_experts
    attention = load_model(tiny_dir, expert_ids=[])
    shards = [load_model(tiny_dir, attention=False, expert_ids=ids)
              for ids in (range(0, 5), range(5, 11), range(11, n))]
    # Each load materialises only what it keeps.
    assert param_bytes(attention) + sum(map(param_bytes, shards)) == param_bytes(whole)
    assert all(p.device.type == "meta" for s in shards for name, p in s.named_parameters() if "experts" not in name)

    def routed(layer_idx, h, ids, weights):
        return sum(s.model.layers[layer_idx].mlp.experts(h, ids, weights) for s in shards)

    input_ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(6))
    assert rel_err(attention(input_ids, routed_fn=routed), whole(input_ids)) < 1e-6


def test_routed_fn_in_flight_overlaps_the_shared_experts(tiny_dir):
    """A ``routed_fn`` that returns a callable (the cluster's exchange in flight): the shared experts run between
    the send and the receive, and the logits equal the whole model's."""
    whole = load_model(tiny_dir)
    attention = load_model(tiny_dir, expert_ids=[])
    events = []
    for layer in attention.model.layers:
        if layer.is_moe:
            layer.mlp.shared_experts.register_forward_hook(lambda *_: events.append("shared"))

    def routed(layer_idx, h, ids, weights):
        events.append("send")

        def receive():
            events.append("receive")
            return whole.model.layers[layer_idx].mlp.experts(h, ids, weights)
        return receive

    input_ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(7))
    assert rel_err(attention(input_ids, routed_fn=routed), whole(input_ids)) < 1e-6
    moe_layers = sum(layer.is_moe for layer in attention.model.layers)
    assert moe_layers and events == ["send", "shared", "receive"] * moe_layers


def test_published_configs_parse():
    from latentmoe.model.tiny import published_config

    v2 = ModelConfig.from_dict(published_config("deepseek-v2"))
    lite = ModelConfig.from_dict(published_config("deepseek-v2-lite"))
    assert (v2.n_routed_experts, v2.n_group, v2.topk_group, v2.topk_method) == (160, 8, 3, "group_limited_greedy")
    assert (lite.q_lora_rank, lite.topk_method, lite.num_hidden_layers) == (None, "greedy", 27)
    assert v2.rope.rope_type == "yarn" and v2.rope.factor == 40
    assert lite.latent_dim == 576 and lite.latent_dim * lite.num_hidden_layers * 2 == 31_104
    # DESIGN §5: V2-Lite caches about 7.1x less than MHA with the same heads, V2 about 57x less.
    assert round(lite.mha_cache_values_per_token() / lite.latent_dim, 1) == 7.1
    assert round(v2.mha_cache_values_per_token() / v2.latent_dim) == 57


def test_both_rope_forms_are_the_same_config():
    hub = small_config()
    v5 = small_config()
    scaling = v5.pop("rope_scaling")
    v5["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": v5.pop("rope_theta"), **scaling}
    assert ModelConfig.from_dict(hub) == ModelConfig.from_dict(v5)


@pytest.mark.parametrize("override,message", [
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
    ({"n_group": 5}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "foo": 1}}, "foo"),
    ({"some_new_option": 1}, "some_new_option"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unsupported_config_is_rejected_by_name(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.from_dict(small_config(**override))


def test_bad_checkpoints_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = small_config()
    good = write_checkpoint(tmp_path / "good", cfg)
    tensors = load_file(good / "model.safetensors")

    def variant(name, mutate):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text((good / "config.json").read_text())
        t = dict(tensors)
        mutate(t)
        save_file(t, path / "model.safetensors")
        return path

    missing = variant("missing", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(missing)
    # A shard that does not want the missing tensor loads fine.
    load_model(missing, attention=False, expert_ids=[0, 1])

    shape = variant("shape", lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(5, 5)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight has shape \[5, 5\]"):
        load_model(shape)

    extra = variant("extra", lambda t: t.update({"model.layers.7.mlp.experts.0.gate_proj.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.7"):
        load_model(extra)

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((good / "config.json").read_text())
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(good, dtype="int8")


def test_make_tiny_is_deterministic(tmp_path):
    from latentmoe.model.tiny import make_tiny

    a = make_tiny(tmp_path / "a", seed=7)
    b = make_tiny(tmp_path / "b", seed=7)
    c = make_tiny(tmp_path / "c", seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").exists()
