"""Kernels for the hot paths, each with a pure-torch reference of the same op.

``latentmoe.kernels.mla_decode`` and ``latentmoe.kernels.fused_moe`` each hold a Triton
kernel and its launcher (named like the module), and re-export its reference (``*_ref``),
which lives in ``latentmoe.kernels.reference`` (no triton import). ``latentmoe.kernels.cpu``
holds the CPU's: in Numba, MLA decode over the paged cache in place and small batches' routed
experts; with PyTorch's oneDNN, the dense projections on prepacked weights. ``kernel_family(setting,
device)`` says which the engine runs; ``set_kernels(model, family)`` puts them on a model, in one pass.
The launchers' modules import triton or numba; this package and ``reference`` do not.
"""

from __future__ import annotations

import importlib.util
import os

import torch


KERNEL_SETTINGS = ("auto", "triton", "numba", "torch")


def numba_available() -> bool:
    """Whether numba is installed (without importing it: ``latentmoe.kernels.cpu`` sets its cache first)."""
    return importlib.util.find_spec("numba") is not None


def kernel_family(setting: str, device: torch.device | str) -> str:
    """The kernels an engine runs: ``"triton"``, ``"numba"`` or ``"torch"`` (the references).

    ``"auto"``: Triton on CUDA devices; on the CPU, the Numba kernels when numba is installed (a dependency of
    the package; a GPU machine's own Python may lack it), else the references. Forcing Triton on the CPU needs
    ``TRITON_INTERPRET=1`` in the environment (the interpreter is slow: tests only).
    """
    device = torch.device(device)
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNEL_SETTINGS))}, got {setting!r}")
    if setting == "auto":
        if device.type == "cuda":
            return "triton"
        return "numba" if device.type == "cpu" and numba_available() else "torch"
    if setting == "numba":
        if device.type != "cpu":
            raise ValueError(f"kernels='numba' runs on the CPU only, not on {device.type}")
        if not numba_available():
            raise ValueError("kernels='numba' needs numba installed (pip install numba)")
    if setting == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
    return setting


def _by_columns(w: torch.Tensor) -> bool:
    return w.transpose(1, 2).is_contiguous()


def experts_by_columns(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the experts' weights lie as the CPU kernel (``kernels.cpu``) reads them: each expert's matrices
    stored by columns (``w13[e].t()`` and ``w2[e].t()`` contiguous), as ``lay_out_experts`` leaves them."""
    return _by_columns(w13) and _by_columns(w2)


def lay_out_experts(experts: torch.nn.Module, by_columns: bool) -> None:
    """Store ``experts.w13`` and ``w2`` (``RoutedExperts``) by columns (the CPU kernel's layout) or by rows (the
    others'), in place of the present storage; their shapes and values stay. A no-op where they already lie so,
    or are not materialised."""
    for name in ("w13", "w2"):
        p = getattr(experts, name)
        if p.device.type == "meta" or p.numel() == 0:
            continue
        if by_columns and not _by_columns(p):
            p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
        elif not by_columns and not p.is_contiguous():
            p.data = p.data.contiguous()


def set_kernels(model: torch.nn.Module, family: str) -> None:
    """Set every layer's MLA decode and routed-expert implementations for ``family`` (``kernel_family``'s answer),
    and the dense projections' product (the CPU's: oneDNN on prepacked weights; the others: ``F.linear``); the
    routed experts' weights are laid out for them (by columns for the CPU's, ``lay_out_experts``).

    The one place kernels are chosen (engines, attention and expert shards all call it). Layers whose
    parts are not materialised (an expert shard's attention) get them too; they are never called.
    """
    from latentmoe.kernels.reference import fused_moe_ref as moe_impl
    from latentmoe.kernels.reference import mla_decode_ref as decode_impl
    from latentmoe.model.deepseek_v2 import Linear

    pack = None  # weight -> the product's implementation (None: F.linear)

    if family == "triton":
        from latentmoe.kernels.fused_moe import fused_moe as moe_impl
        from latentmoe.kernels.mla_decode import mla_decode as decode_impl
    elif family == "numba":
        from latentmoe.kernels.cpu import fused_moe_cpu as moe_impl
        from latentmoe.kernels.cpu import mla_decode_cpu as decode_impl
        from latentmoe.kernels.cpu import packed_linear as pack
        from latentmoe.kernels.cpu import warm_up

        warm_up()
    elif family != "torch":
        raise ValueError(f"unknown kernel family {family!r}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.impl = pack(module.weight) if pack is not None else None
    for layer in model.model.layers:
        layer.self_attn.decode_impl = decode_impl
        if layer.is_moe:
            layer.mlp.experts.moe_impl = moe_impl
            lay_out_experts(layer.mlp.experts, by_columns=family == "numba")
