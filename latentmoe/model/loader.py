"""Load (and write) Hugging Face DeepSeek-V2/V3 checkpoints, tensor by tensor.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, with the Hub's tensor names (one
tensor per expert projection). ``load_model`` takes a filter (``attention``,
``expert_ids``) so that a shard materialises only what it keeps: the rest of the
module tree stays on the ``meta`` device and costs no memory, and tensors are read
one at a time, so peak memory is what the shard keeps plus one tensor.

DeepSeek's FP8 checkpoints (``float8_e4m3fn`` weights with ``<name>_scale_inv`` beside
them) are dequantized tensor by tensor into the serving dtype (``latentmoe.model.fp8``).
A V3 checkpoint's multi-token-prediction layers (``model.layers.{num_hidden_layers + i}``)
are skipped, with one log line. The router (``mlp.gate``: weight and V3's
``e_score_correction_bias``) is kept in float32 whatever the serving dtype, as
transformers does: it only chooses experts, and bf16 would change its choices.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentmoe.model import fp8
from latentmoe.model.config import ModelConfig
from latentmoe.model.deepseek_v2 import DeepseekV2ForCausalLM
from latentmoe.model.rope import RotaryEmbedding

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ROUTER = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")  # kept in float32


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}: choose float32, bfloat16 or float16")
    return dtype


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


class _Target:
    """Where one Hub tensor goes: a parameter, possibly one expert's slice of a stacked parameter."""

    def __init__(self, param: str, shape: tuple[int, ...], index: tuple = ()):
        self.param, self.shape, self.index = param, shape, index


def hub_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hub tensor name of a full checkpoint with this config, and its shape."""
    model = build_model(config, device="meta")
    layout = {}
    inter, D = config.moe_intermediate_size, config.hidden_size
    for name, p in model.named_parameters():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(w13|w2)$", name)
        if m is None:
            layout[name] = tuple(p.shape)
            continue
        for e in range(config.n_routed_experts):
            if m.group(2) == "w13":
                layout[f"{m.group(1)}.{e}.gate_proj.weight"] = (inter, D)
                layout[f"{m.group(1)}.{e}.up_proj.weight"] = (inter, D)
            else:
                layout[f"{m.group(1)}.{e}.down_proj.weight"] = (D, inter)
    if config.tie_word_embeddings:
        layout.pop("lm_head.weight", None)
    return layout


def build_model(
    config: ModelConfig, *, attention: bool = True, expert_ids: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> DeepseekV2ForCausalLM:
    """The module tree with only the kept parameters allocated (uninitialised); the rest on ``meta``."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config, expert_ids)
    if str(device) == "meta":
        return model
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if _is_expert_param(full) or attention:
                kept = torch.float32 if full.endswith(_ROUTER) else dtype
                setattr(module, pname, torch.nn.Parameter(torch.empty(p.shape, dtype=kept, device=device),
                                                          requires_grad=False))
        if hasattr(module, "local_index"):
            local = torch.full((config.n_routed_experts,), -1, dtype=torch.long, device=device)
            local[module.expert_ids] = torch.arange(len(module.expert_ids), device=device)
            module.local_index = local
    model.rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim).to(device)
    return model.eval()


def _is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def _targets(config: ModelConfig, model: DeepseekV2ForCausalLM) -> dict[str, _Target]:
    """Hub names this model wants -> where they go."""
    params = dict(model.named_parameters())
    inter = config.moe_intermediate_size
    targets = {}
    for name, shape in hub_layout(config).items():
        m = _EXPERT.match(name)
        if m is None:
            if name in params and params[name].device.type != "meta":
                targets[name] = _Target(name, shape)
            continue
        layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        experts = model.model.layers[layer].mlp.experts
        if expert not in experts.expert_ids:
            continue
        slot = experts.expert_ids.index(expert)
        prefix = f"model.layers.{layer}.mlp.experts"
        if proj == "gate_proj":
            targets[name] = _Target(f"{prefix}.w13", shape, (slot, slice(0, inter)))
        elif proj == "up_proj":
            targets[name] = _Target(f"{prefix}.w13", shape, (slot, slice(inter, 2 * inter)))
        else:
            targets[name] = _Target(f"{prefix}.w2", shape, (slot,))
    return targets


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.float32, *, attention: bool = True,
    expert_ids: Iterable[int] | None = None, device: str | torch.device = "cpu",
) -> DeepseekV2ForCausalLM:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint (DeepSeek's FP8 ones dequantized into ``dtype``).

    ``attention=False`` skips everything but routed experts; ``expert_ids`` limits the routed
    experts loaded (``None``: all, ``[]``: none). Missing, unexpected and misshapen tensors (and
    FP8 scales) are errors that name the tensor. The model is in eval mode.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    config = ModelConfig.from_json(path)
    if expert_ids is not None:
        expert_ids = sorted(set(expert_ids))
    model = build_model(config, attention=attention, expert_ids=expert_ids, dtype=dtype, device=device)
    targets = _targets(config, model)
    layout = hub_layout(config)
    files = _skip_mtp_layers(config, checkpoint_files(path), path)

    scales = {name for name in files if name.endswith(fp8.SCALE_SUFFIX)}
    unexpected = sorted(set(files) - scales - set(layout)
                        - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) for this config: {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    missing = sorted(set(targets) - set(files))
    if missing:
        raise ValueError(f"{path}: missing tensor(s): {missing[:5]}{' …' if len(missing) > 5 else ''}")

    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in targets:
        by_file[files[name]].append(name)
    handles = _Handles()
    try:
        _check_scales(config, files, scales, handles, path)
        for file, names in sorted(by_file.items()):
            f = handles[file]
            for name in names:
                target = targets[name]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != target.shape:
                    raise ValueError(f"{path}: tensor {name} has shape {list(shape)}, expected {list(target.shape)}")
                out = params[target.param].data[target.index]
                tensor = f.get_tensor(name)
                if tensor.dtype == fp8.FP8_DTYPE:
                    # Serving FP8 on a GPU would keep `tensor` and its scale here instead.
                    scale = handles[files[name + fp8.SCALE_SUFFIX]].get_tensor(name + fp8.SCALE_SUFFIX)
                    fp8.dequantize_into(out, tensor, scale, config.fp8_block_size)
                else:
                    out.copy_(tensor)
                del tensor
            handles.close(file)  # its pages read so far leave the resident set
    finally:
        handles.close_all()
    if attention and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


class _Handles(dict):
    """Open safetensors files (memory-mapped: the pages a read touches count as resident until the file is
    closed), opened on first use, reopened after ``close``."""

    def __missing__(self, file: Path):
        self[file] = safe_open(file, framework="pt", device="cpu").__enter__()
        return self[file]

    def close(self, file: Path) -> None:
        handle = self.pop(file, None)
        if handle is not None:
            handle.__exit__(None, None, None)

    def close_all(self) -> None:
        for file in list(self):
            self.close(file)


def _skip_mtp_layers(config: ModelConfig, files: dict[str, Path], path: Path) -> dict[str, Path]:
    """Drop the multi-token-prediction layers' tensors (V3: ``model.layers.61.*``), saying so once."""
    first, last = config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers
    skipped = {n for n in files if (m := _LAYER.match(n)) and first <= int(m.group(1)) < last}
    if skipped:
        logger.warning("%s: skipping the %d tensors of the multi-token-prediction layer(s) %s (num_nextn_predict_"
                       "layers=%d): latentmoe does not serve them", path, len(skipped),
                       list(range(first, last)), config.num_nextn_predict_layers)
    return {n: f for n, f in files.items() if n not in skipped}


def _check_scales(config: ModelConfig, files: dict[str, Path], scales: set[str], handles: _Handles,
                  path: Path) -> None:
    """Every float8 tensor has its ``_scale_inv`` of the right shape, and every scale a float8 tensor.

    Reads only the safetensors headers, of every tensor in the checkpoint (a shard that loads a part of it
    still refuses a broken one).
    """
    block = config.fp8_block_size
    for scale in sorted(scales):
        weight = scale[: -len(fp8.SCALE_SUFFIX)]
        if weight not in files:
            raise ValueError(f"{path}: unexpected scale {scale}: the checkpoint has no tensor {weight}")
        if handles[files[weight]].get_slice(weight).get_dtype() != "F8_E4M3":
            raise ValueError(f"{path}: unexpected scale {scale}: {weight} is not a float8_e4m3fn tensor")
    for name in sorted(set(files) - scales):
        f = handles[files[name]]
        if f.get_slice(name).get_dtype() != "F8_E4M3":
            continue
        if block is None:
            raise ValueError(f"{path}: tensor {name} is float8_e4m3fn but config.json has no quantization_config")
        scale = name + fp8.SCALE_SUFFIX
        if scale not in files:
            raise ValueError(f"{path}: missing scale {scale} of the float8 tensor {name}")
        shape = tuple(f.get_slice(name).get_shape())
        scale_shape = tuple(handles[files[scale]].get_slice(scale).get_shape())
        if len(shape) != 2 or scale_shape != fp8.scale_shape(shape, block):
            raise ValueError(f"{path}: scale {scale} has shape {list(scale_shape)}, expected "
                             f"{list(fp8.scale_shape(shape, block)) if len(shape) == 2 else 'a 2-d weight'} for "
                             f"{name} {list(shape)} in blocks of {list(block)}")


def iter_hub_tensors(model: DeepseekV2ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's materialised parameters under Hub names (experts unstacked)."""
    config = model.config
    inter = config.moe_intermediate_size
    for name, p in model.named_parameters(remove_duplicate=True):
        if p.device.type == "meta" or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(w13|w2)$", name)
        if m is None:
            yield name, p.data
            continue
        experts = model.get_submodule(m.group(1))
        for slot, e in enumerate(experts.expert_ids):
            if m.group(2) == "w13":
                yield f"{m.group(1)}.{e}.gate_proj.weight", p.data[slot, :inter]
                yield f"{m.group(1)}.{e}.up_proj.weight", p.data[slot, inter:]
            else:
                yield f"{m.group(1)}.{e}.down_proj.weight", p.data[slot]


def save_checkpoint(model: DeepseekV2ForCausalLM, out_dir: str | Path, max_shard_bytes: int | None = None,
                    *, fp8_block_size: tuple[int, int] | None = None) -> None:
    """Write ``config.json`` and safetensors in the Hub format (sharded with an index when ``max_shard_bytes``).

    ``fp8_block_size`` (DeepSeek's: ``(128, 128)``) writes DeepSeek's FP8 format: every ``*_proj.weight`` as
    ``float8_e4m3fn`` with its ``_scale_inv``, and ``quantization_config`` in ``config.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hub = model.config.to_hub_dict() | {"torch_dtype": str(model.lm_head.weight.dtype).split(".")[-1]}
    hub.pop("quantization_config", None)
    if fp8_block_size is not None:
        hub["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(fp8_block_size)}
    with open(out_dir / "config.json", "w") as f:
        json.dump(hub, f, indent=2)

    def tensors():
        for name, t in iter_hub_tensors(model):
            if fp8_block_size is not None and fp8.is_quantized_name(name):
                q, scale = fp8.quantize(t, fp8_block_size)
                yield name, q
                yield name + fp8.SCALE_SUFFIX, scale
            else:
                yield name, t

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().clone()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1 and not max_shard_bytes:
        save_file(shards[0], out_dir / "model.safetensors", metadata=meta)
        (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale one would be read first
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata=meta)
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
