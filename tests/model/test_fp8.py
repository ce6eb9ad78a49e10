"""DeepSeek's block-FP8 checkpoints: written here in DeepSeek's format from random weights (this file's own quantizer
and dequantizer, independent of latentmoe.model.fp8), loaded by latentmoe, compared with transformers run on the same
dequantized weights; bad scales are errors that name the tensor; peak memory while loading is measured."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentmoe.model import ModelConfig, build_model, load_model
from latentmoe.model.loader import checkpoint_files, iter_hub_tensors
from latentmoe.model.tiny import TINY_V3_CONFIG, init_random

import transformers  # noqa: E402 (a test dependency: the reference, never skipped)
BLOCK = 128
QUANTIZED = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's format: float8_e4m3fn values, one float32 ``scale_inv`` per 128x128 block (weight = fp8 * s)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-rows // BLOCK), -(-cols // BLOCK))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    w = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            w[rows, cols] = q[rows, cols].float() * s[i, j]
    return w


def is_quantized(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in QUANTIZED


def fp8_config(**overrides) -> dict:
    cfg = dict(TINY_V3_CONFIG, vocab_size=512, num_nextn_predict_layers=0, hidden_size=160, q_lora_rank=144,
               intermediate_size=272, moe_intermediate_size=48)  # weights of whole and partial 128-blocks
    cfg.update(overrides)
    return ModelConfig.from_dict(cfg).to_hub_dict()  # every key written, as published configs have them


def write_fp8_checkpoint(path, cfg: dict, seed: int = 0, num_files: int = 3) -> dict[str, torch.Tensor]:
    """Random weights in DeepSeek's FP8 layout, over ``num_files`` shards with an index; a weight's scale is put
    in the next file (a real checkpoint may split them too). Returns the dequantized tensors."""
    model = build_model(ModelConfig.from_dict(cfg))
    init_random(model, seed)
    stored, dequantized = {}, {}
    for name, t in iter_hub_tensors(model):
        if is_quantized(name):
            q, s = quantize(t)
            stored[name], stored[name + "_scale_inv"] = q, s
            dequantized[name] = dequantize(q, s)
        else:
            stored[name] = dequantized[name] = t.clone()
    names = sorted(stored)
    weight_map = {}
    files = [{} for _ in range(num_files)]
    for i, name in enumerate(n for n in names if not n.endswith("_scale_inv")):
        files[i % num_files][name] = stored[name]
        if name + "_scale_inv" in stored:
            files[(i + 1) % num_files][name + "_scale_inv"] = stored[name + "_scale_inv"]
    path.mkdir(parents=True, exist_ok=True)
    for k, tensors in enumerate(files):
        file = f"model-{k + 1:05d}-of-{num_files:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, path / file, metadata={"format": "pt"})
        weight_map |= {n: file for n in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(cfg, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "weight_block_size": [BLOCK, BLOCK]})
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def write_plain(path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def hf_logits(path, input_ids):
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf.eval()(input_ids).logits.float()


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(the FP8 checkpoint, the same weights dequantized by this file, as a plain float32 checkpoint)."""
    root = tmp_path_factory.mktemp("fp8")
    cfg = fp8_config()
    dequantized = write_fp8_checkpoint(root / "fp8", cfg, seed=3)
    write_plain(root / "plain", cfg, dequantized)
    return root / "fp8", root / "plain"


def test_the_checkpoint_is_deepseeks_format(fp8_pair):
    fp8_dir, _ = fp8_pair
    files = checkpoint_files(fp8_dir)
    with safe_open(files["model.layers.1.self_attn.q_b_proj.weight"], "pt") as f:
        w = f.get_tensor("model.layers.1.self_attn.q_b_proj.weight")
    assert w.dtype == torch.float8_e4m3fn and w.shape == (4 * 24, 144)
    q_b = "model.layers.1.self_attn.q_b_proj.weight"
    assert files[q_b] != files[q_b + "_scale_inv"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in files
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in files  # the router stays as it is


def test_fp8_loads_and_equals_transformers_on_the_dequantized_weights(fp8_pair):
    fp8_dir, plain_dir = fp8_pair
    ours = load_model(fp8_dir)
    plain = dict(load_model(plain_dir).named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, plain[name]), name  # the same arithmetic: fp8 -> float32, times the block's scale
    input_ids = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(1))
    logits = ours(input_ids)
    ref = hf_logits(plain_dir, input_ids)
    assert rel_err(logits, ref) < 1e-4
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    # bfloat16 serving from the same FP8 checkpoint: bf16 rounding (and the odd expert choice it flips)
    half = load_model(fp8_dir, dtype="bfloat16")(input_ids)
    assert rel_err(half, ref) < 0.1 and (half.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_fp8_shards_load_their_part(fp8_pair):
    fp8_dir, _ = fp8_pair
    whole = load_model(fp8_dir)
    shard = load_model(fp8_dir, attention=False, expert_ids=[2, 5, 11])
    experts, full = shard.model.layers[2].mlp.experts, whole.model.layers[2].mlp.experts
    assert torch.equal(experts.w13, full.w13[[2, 5, 11]]) and torch.equal(experts.w2, full.w2[[2, 5, 11]])
    assert shard.model.layers[2].self_attn.kv_b_proj.weight.device.type == "meta"


def variant(tmp_path, source, name, mutate_tensors=None, mutate_config=None):
    """A copy of ``source`` as one file, with its tensors / config changed."""
    files = checkpoint_files(source)
    tensors = {}
    for n, file in files.items():
        with safe_open(file, "pt") as f:
            tensors[n] = f.get_tensor(n)
    if mutate_tensors:
        mutate_tensors(tensors)
    config = json.loads((source / "config.json").read_text())
    if mutate_config:
        mutate_config(config)
    write_plain(tmp_path / name, config, tensors)
    return tmp_path / name


SCALE = "model.layers.1.mlp.experts.4.up_proj.weight_scale_inv"
WEIGHT = "model.layers.1.mlp.experts.4.up_proj.weight"


@pytest.mark.parametrize("name,mutate_tensors,mutate_config,message", [
    ("missing", lambda t: t.pop(SCALE), None, rf"missing scale {SCALE} of the float8 tensor {WEIGHT}"),
    ("misshapen", lambda t: t.update({SCALE: torch.ones(2, 2)}), None,
     rf"scale {SCALE} has shape \[2, 2\], expected \[1, 2\] for {WEIGHT} \[48, 160\]"),
    ("extra_for_plain_tensor", lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1, 1)}), None,
     r"unexpected scale model\.norm\.weight_scale_inv: model\.norm\.weight is not a float8_e4m3fn tensor"),
    ("extra_for_nothing", lambda t: t.update({"model.layers.1.mlp.foo.weight_scale_inv": torch.ones(1)}), None,
     r"unexpected scale model\.layers\.1\.mlp\.foo\.weight_scale_inv: the checkpoint has no tensor"),
    ("no_quantization_config", None, lambda c: c.pop("quantization_config"),
     r"is float8_e4m3fn but config\.json has no quantization_config"),
])
def test_bad_scales_name_the_tensor(fp8_pair, tmp_path, name, mutate_tensors, mutate_config, message):
    bad = variant(tmp_path, fp8_pair[0], name, mutate_tensors, mutate_config)
    with pytest.raises(ValueError, match=message):
        load_model(bad)


# Peak memory of a load, in a fresh interpreter: VmHWM (peak resident set) minus the resident set just before.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from latentmoe.model import build_model, load_model
    from latentmoe.model.config import ModelConfig

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    build_model(ModelConfig.from_json(sys.argv[1]), device="meta")  # torch's lazy imports (~150 MB) before it
    before = status("VmRSS:")
    model = load_model(sys.argv[1], dtype=sys.argv[2])
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak_growth": status("VmHWM:") - before, "kept": kept}))
""")


def test_fp8_load_peak_memory_stays_near_the_dequantized_size(tmp_path):
    """About 175 MiB dequantized (float32) from 56 MiB of FP8 in 4 files: the load's peak must be what it keeps plus
    little (the pages of the file being read, a chunk of rows at a time), not a second copy of the model."""
    cfg = fp8_config(hidden_size=512, q_lora_rank=256, intermediate_size=1024, moe_intermediate_size=256,
                     n_routed_experts=32, n_group=4, num_hidden_layers=4, vocab_size=4096)
    write_fp8_checkpoint(tmp_path / "big", cfg, seed=1, num_files=4)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    largest_file = max(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big"), "float32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    kept, peak = measured["kept"], measured["peak_growth"]
    print(f"dequantized {kept / 2**20:.1f} MiB, FP8 on disk {on_disk / 2**20:.1f} MiB, "
          f"peak growth while loading {peak / 2**20:.1f} MiB ({peak / kept:.2f}x)")
    assert kept > 150 * 2**20
    assert peak >= 0.95 * kept  # really measured: the weights are resident
    # no second copy: what it keeps, plus the pages of the one file being read (memory-mapped) and a chunk's work
    assert peak <= kept + largest_file + 32 * 2**20
    assert peak <= 1.25 * kept
