"""DeepSeek's block-quantized FP8 weights: ``float8_e4m3fn`` values and one float32 scale per block.

A linear weight ``W [O, I]`` is stored as ``W_fp8 [O, I]`` and ``W_scale_inv [ceil(O / bo), ceil(I / bi)]``
(``weight_block_size: [bo, bi]``, 128 x 128 in DeepSeek-V3 and Kimi-K2): ``W = W_fp8 * scale_inv`` block by
block, the last blocks of a row or column possibly partial. Dequantization here runs on any CPU or GPU (no FP8
compute needed) and writes into a given tensor a few blocks of rows at a time, so it needs no full-size
float32 copy. Which tensors DeepSeek quantizes: every ``*_proj.weight`` (attention, dense MLP, shared and
routed experts); the embedding, ``lm_head``, norms and the router stay as they are.

Legend: O output rows, I input columns, bo x bi the block.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"


def is_quantized_name(name: str) -> bool:
    """The tensors DeepSeek's FP8 checkpoints store in FP8 (linear projections)."""
    return name.endswith("_proj.weight")


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The ``_scale_inv`` shape of a weight: one value per (possibly partial) block."""
    (rows, cols), (bo, bi) = weight_shape, block
    return -(-rows // bo), -(-cols // bi)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [O, I]`` -> ``(weight_fp8 [O, I], scale_inv [ceil(O/bo), ceil(I/bi)] float32)``, each block scaled
    so its largest magnitude maps to ``FP8_MAX``."""
    rows, cols = weight.shape
    bo, bi = block
    so, si = scale_shape(weight.shape, block)
    padded = weight.new_zeros(so * bo, si * bi, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(so, bo, si, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [so, si]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(so * bo, si * bi)
    return q[:rows, :cols].to(FP8_DTYPE).contiguous(), scale_inv.contiguous()


@torch.no_grad()
def dequantize_into(out: torch.Tensor, weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                    *, rows_per_chunk: int = 1024) -> None:
    """``out [O, I] = weight_fp8 * scale_inv`` (per block) in ``out``'s dtype, ``rows_per_chunk`` rows at a time."""
    rows, cols = weight_fp8.shape
    bo, bi = block
    assert out.shape == weight_fp8.shape, f"out {tuple(out.shape)} vs weight {tuple(weight_fp8.shape)}"
    assert scale_inv.shape == scale_shape(weight_fp8.shape, block), \
        f"scale {tuple(scale_inv.shape)} for weight {tuple(weight_fp8.shape)}, block {block}"
    step = max(bo, rows_per_chunk // bo * bo)  # whole blocks of rows
    col_scale = scale_inv.float().repeat_interleave(bi, dim=1)[:, :cols]  # [so, I]
    for start in range(0, rows, step):
        end = min(start + step, rows)
        scales = col_scale[start // bo : -(-end // bo)].repeat_interleave(bo, dim=0)  # [rows of these blocks, I]
        chunk = weight_fp8[start:end].to(device=out.device, dtype=torch.float32)  # [end - start, I]
        out[start:end] = (chunk * scales[: end - start].to(out.device)).to(out.dtype)
