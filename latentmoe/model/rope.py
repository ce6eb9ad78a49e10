"""Rotary position embedding over interleaved pairs, with DeepSeek's YaRN scaling.

DeepSeek-V2 rotates pairs ``(x[2i], x[2i+1])`` (the complex-number form), not the
two halves of the vector. YaRN blends interpolated and extrapolated frequencies
over a ramp and scales cos/sin by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``;
the softmax scale gets ``mscale(factor, mscale_all_dim)**2`` (see ``ModelConfig.softmax_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from latentmoe.model.config import RopeConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim / 2]`` (float32) and the cos/sin magnitude."""
    pos_freqs = rope.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq_extra = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return inv_freq_extra, 1.0
    inv_freq_inter = 1.0 / (rope.factor * pos_freqs)
    low = _correction_dim(rope.beta_fast, dim, rope.rope_theta, rope.original_max_position_embeddings)
    high = _correction_dim(rope.beta_slow, dim, rope.rope_theta, rope.original_max_position_embeddings)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_mask = 1.0 - ramp  # 1 where we keep the original (extrapolated) frequency
    inv_freq = inv_freq_inter * (1 - extra_mask) + inv_freq_extra * extra_mask
    if rope.attention_factor is not None:
        magnitude = rope.attention_factor
    else:
        magnitude = rope.yarn_mscale(rope.mscale) / rope.yarn_mscale(rope.mscale_all_dim)
    return inv_freq, magnitude


class RotaryEmbedding(nn.Module):
    """``cos``/``sin`` for given positions; ``rotate`` applies them to interleaved pairs."""

    def __init__(self, rope: RopeConfig, dim: int):
        super().__init__()
        inv_freq, self.magnitude = rope_inv_freq(rope, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., dim/2]
        return torch.cos(freqs) * self.magnitude, torch.sin(freqs) * self.magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [..., T, (H,) dim]``; ``cos``/``sin`` broadcast as ``[..., T, (1,) dim/2]``."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., dim/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
