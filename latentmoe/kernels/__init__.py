"""Kernels for the hot paths, each with a pure-torch reference of the same op.

``latentmoe.kernels.mla_decode`` and ``latentmoe.kernels.fused_moe`` each hold a Triton
kernel, its launcher (named like the module) and the reference (``*_ref``), which is also
the CPU default. ``use_triton(setting, device)`` says which the engine runs. The launchers'
modules import triton; import them from their modules, not from this package.
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
