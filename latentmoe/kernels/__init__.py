"""Kernels for the hot paths, each with a pure-torch reference of the same op.

``latentmoe.kernels.mla_decode`` and ``latentmoe.kernels.fused_moe`` each hold a Triton
kernel and its launcher (named like the module), and re-export its reference (``*_ref``),
which lives in ``latentmoe.kernels.reference`` (no triton import) and is also the CPU
default. ``use_triton(setting, device)`` says which the engine runs; ``set_kernels(model,
triton)`` puts them on a model, in one pass. The launchers' modules import triton; this
package and ``reference`` do not.
"""

from __future__ import annotations

import os

import torch


def use_triton(setting: str, device: torch.device | str) -> bool:
    """``"auto"``: Triton on CUDA devices, torch references elsewhere; ``"triton"`` / ``"torch"`` force one.

    Forcing Triton on the CPU needs ``TRITON_INTERPRET=1`` in the environment (the interpreter is slow:
    tests only).
    """
    device = torch.device(device)
    if setting == "torch":
        return False
    if setting == "auto":
        return device.type == "cuda"
    if setting != "triton":
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {setting!r}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
    return True


def set_kernels(model: torch.nn.Module, triton: bool) -> None:
    """Set every layer's MLA decode and routed-expert implementations: the Triton launchers or the torch references.

    The one place kernels are chosen (engines, attention and expert shards all call it). Layers whose
    parts are not materialised (an expert shard's attention) get them too; they are never called.
    """
    if triton:
        from latentmoe.kernels.fused_moe import fused_moe as moe_impl
        from latentmoe.kernels.mla_decode import mla_decode as decode_impl
    else:
        from latentmoe.kernels.reference import fused_moe_ref as moe_impl
        from latentmoe.kernels.reference import mla_decode_ref as decode_impl
    for layer in model.model.layers:
        layer.self_attn.decode_impl = decode_impl
        if layer.is_moe:
            layer.mlp.experts.moe_impl = moe_impl
