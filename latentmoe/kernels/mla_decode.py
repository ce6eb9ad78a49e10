"""MLA decode over the paged latent cache.

Absorbed queries attend in latent space: for each sequence b and head h,
``score[t] = q_nope[b, h] · c_kv[t] + q_pe[b, h] · k_pe[t]`` over the sequence's
cached tokens, and ``out[b, h] = Σ_t softmax(score * scale)[t] c_kv[t]``.
The cache is ``[num_blocks, block_size, kv_lora_rank + rope]`` (``[c_kv | k_pe]``
per token); ``block_tables[b, i]`` is the i-th block of sequence b.

The Triton kernel splits each sequence into ``num_splits`` chunks (split-K): one program
per (sequence, head group, split) streams its chunk once for all heads of the group with
an online softmax and writes a partial ``(max, sum, acc)``; a second kernel merges the
partials. With one split the first kernel writes the output itself.

Legend: B batch, H heads, R kv_lora_rank, P rope dims, N blocks, S block size.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from latentmoe.kernels.reference import mla_decode_ref  # noqa: F401  (re-exported: the reference of this op)

__all__ = ["mla_decode", "mla_decode_ref", "num_decode_splits"]


@triton.jit
def _mla_decode_split_kernel(
    # pointers
    q_nope_ptr, q_pe_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    # sizes
    num_heads, num_splits, scale_log2,
    # strides
    stride_qn_b, stride_qn_h,
    stride_qp_b, stride_qp_h,
    stride_kv_n, stride_kv_s,
    stride_bt_b,
    stride_o_b, stride_o_h,
    # meta-parameters
    KV_LORA_RANK: tl.constexpr, ROPE_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_SIZE_H: tl.constexpr, BLOCK_SIZE_R: tl.constexpr, BLOCK_SIZE_P: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    WRITE_OUTPUT: tl.constexpr,
):
    """One (sequence, head group, split): online softmax over the split's tokens, for all heads of the group."""
    b = tl.program_id(0)
    head_group = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    # every split but the last covers a whole number of tiles
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_SIZE_N) * BLOCK_SIZE_N
    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, seq_len)

    offs_h = head_group * BLOCK_SIZE_H + tl.arange(0, BLOCK_SIZE_H)
    offs_r = tl.arange(0, BLOCK_SIZE_R)
    offs_p = tl.arange(0, BLOCK_SIZE_P)
    mask_h = offs_h < num_heads
    mask_r = offs_r < KV_LORA_RANK
    mask_p = offs_p < ROPE_DIM

    q_nope = tl.load(q_nope_ptr + b * stride_qn_b + offs_h[:, None] * stride_qn_h + offs_r[None, :],
                     mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BH, BR]
    q_pe = tl.load(q_pe_ptr + b * stride_qp_b + offs_h[:, None] * stride_qp_h + offs_p[None, :],
                   mask=mask_h[:, None] & mask_p[None, :], other=0.0)  # [BH, BP]
    if DOT_IN_FP32:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    row_max = tl.full([BLOCK_SIZE_H], float("-inf"), dtype=tl.float32)  # in log2 units
    row_sum = tl.zeros([BLOCK_SIZE_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SIZE_H, BLOCK_SIZE_R], dtype=tl.float32)

    for tile_start in range(split_start, split_end, BLOCK_SIZE_N):
        offs_n = tile_start + tl.arange(0, BLOCK_SIZE_N)  # token positions
        mask_n = offs_n < split_end
        block_ids = tl.load(block_tables_ptr + b * stride_bt_b + offs_n // PAGE_SIZE, mask=mask_n, other=0)
        token_offs = block_ids.to(tl.int64) * stride_kv_n + (offs_n % PAGE_SIZE) * stride_kv_s  # [BN]
        c_kv = tl.load(kv_ptr + token_offs[:, None] + offs_r[None, :],
                       mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BN, BR]
        k_pe = tl.load(kv_ptr + token_offs[:, None] + KV_LORA_RANK + offs_p[None, :],
                       mask=mask_n[:, None] & mask_p[None, :], other=0.0)  # [BN, BP]
        if DOT_IN_FP32:
            c_kv = c_kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)

        scores = tl.dot(q_nope, tl.trans(c_kv), input_precision=DOT_PRECISION)
        scores = tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=DOT_PRECISION)  # [BH, BN]
        scores = tl.where(mask_n[None, :], scores * scale_log2, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        alpha = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])  # [BH, BN]
        row_sum = row_sum * alpha + tl.sum(probs, axis=1)
        probs = probs.to(kv_ptr.dtype.element_ty).to(c_kv.dtype)  # the cache's dtype, as on the GPU
        acc = tl.dot(probs, c_kv, acc * alpha[:, None], input_precision=DOT_PRECISION)
        row_max = new_max

    if WRITE_OUTPUT:  # one split: normalise here, no merge pass
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        tl.store(out_ptr + b * stride_o_b + offs_h[:, None] * stride_o_h + offs_r[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])
    else:  # partials are contiguous: max/sum [B, H, splits], acc [B, H, splits, R]
        part = (b * num_heads + offs_h) * num_splits + split  # [BH]
        tl.store(part_max_ptr + part, row_max, mask=mask_h)
        tl.store(part_sum_ptr + part, row_sum, mask=mask_h)
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * KV_LORA_RANK + offs_r[None, :], acc,
                 mask=mask_h[:, None] & mask_r[None, :])


@triton.jit
def _mla_decode_merge_kernel(
    # pointers
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr,
    # sizes
    num_heads, num_splits,
    # strides
    stride_o_b, stride_o_h,
    # meta-parameters
    KV_LORA_RANK: tl.constexpr, BLOCK_SIZE_R: tl.constexpr,
):
    """One (sequence, head): merge the splits' partial softmaxes into the output row."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_SIZE_R)
    mask_r = offs_r < KV_LORA_RANK
    first = (b * num_heads + h) * num_splits

    total_max = tl.load(part_max_ptr + first)  # in log2 units; -inf for a split with no tokens
    total_sum = tl.load(part_sum_ptr + first)
    acc = tl.load(part_acc_ptr + first.to(tl.int64) * KV_LORA_RANK + offs_r, mask=mask_r, other=0.0)  # [BR]
    for split in range(1, num_splits):
        split_max = tl.load(part_max_ptr + first + split)
        split_sum = tl.load(part_sum_ptr + first + split)
        split_acc = tl.load(part_acc_ptr + (first + split).to(tl.int64) * KV_LORA_RANK + offs_r,
                            mask=mask_r, other=0.0)
        new_max = tl.maximum(total_max, split_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(total_max - safe_max)
        beta = tl.exp2(split_max - safe_max)
        total_sum = total_sum * alpha + split_sum * beta
        acc = acc * alpha + split_acc * beta
        total_max = new_max

    out = acc / tl.where(total_sum > 0, total_sum, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_r, out.to(out_ptr.dtype.element_ty), mask=mask_r)


def _block(n: int) -> int:
    """Tile width for a dimension of n: a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_decode_splits(batch: int, num_head_groups: int, max_seq_len: int, num_sms: int,
                      *, min_tokens_per_split: int = 256, max_splits: int = 64) -> int:
    """Splits per sequence: enough programs for two per SM, none shorter than ``min_tokens_per_split``.

    Each split costs a partial of ``H · R`` float32 written and read again (≈ 28 tokens of a bf16
    576-wide cache at H=16, R=512), hence the floor on its length.
    """
    programs = batch * num_head_groups
    wanted = triton.cdiv(2 * num_sms, max(programs, 1))
    useful = triton.cdiv(max(max_seq_len, 1), min_tokens_per_split)
    return max(1, min(wanted, useful, max_splits))


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mla_decode(
    q_nope: torch.Tensor,  # [B, H, R]
    q_pe: torch.Tensor,  # [B, H, P]
    kv_cache: torch.Tensor,  # [N, S, R + P]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    softmax_scale: float,
    *,
    num_splits: int | None = None,
    block_size_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:  # [B, H, R]
    """Triton MLA decode; same contract as ``mla_decode_ref``.

    ``num_splits`` (default: from the batch size and the block-table width, without a host sync)
    is the number of chunks each sequence is cut into. Any block size works; every block-table
    entry below ``ceil(seq_len / S)`` must be a valid block, the rest are never read.
    """
    B, H, R = q_nope.shape
    assert q_pe.dim() == 3 and q_pe.shape[:2] == (B, H), f"q_pe {tuple(q_pe.shape)} vs q_nope {tuple(q_nope.shape)}"
    P = q_pe.shape[2]
    assert kv_cache.dim() == 3 and kv_cache.shape[2] == R + P, \
        f"kv_cache {tuple(kv_cache.shape)} must be [N, S, R + P] with R={R}, P={P}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, f"block_tables {tuple(block_tables.shape)}, B={B}"
    assert seq_lens.shape == (B,), f"seq_lens {tuple(seq_lens.shape)}, B={B}"
    assert q_nope.dtype in _DTYPES and q_pe.dtype == q_nope.dtype == kv_cache.dtype, \
        f"q_nope {q_nope.dtype}, q_pe {q_pe.dtype}, kv_cache {kv_cache.dtype}: one of {_DTYPES} for all three"
    assert block_tables.dtype in (torch.int32, torch.int64) and seq_lens.dtype in (torch.int32, torch.int64), \
        f"block_tables {block_tables.dtype}, seq_lens {seq_lens.dtype} must be int32 (or int64)"
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("kv_cache", kv_cache), ("block_tables", block_tables)):
        assert t.stride(-1) == 1, f"{name} needs a contiguous last dim, has strides {t.stride()}"
    assert seq_lens.is_contiguous(), f"seq_lens must be contiguous, has strides {seq_lens.stride()}"
    devices = {t.device for t in (q_nope, q_pe, kv_cache, block_tables, seq_lens)}
    assert len(devices) == 1, f"inputs on several devices: {devices}"

    out = torch.empty(B, H, R, dtype=q_nope.dtype, device=q_nope.device)
    if B == 0 or H == 0:
        return out
    page_size = kv_cache.shape[1]
    block_h = 16  # heads per program: the smallest tl.dot operand; more heads make more groups
    num_head_groups = triton.cdiv(H, block_h)
    if num_splits is None:
        num_sms = _num_sms(q_nope.device) if q_nope.is_cuda else 1
        num_splits = num_decode_splits(B, num_head_groups, block_tables.shape[1] * page_size, num_sms)
    assert num_splits >= 1, f"num_splits={num_splits}"
    assert block_size_n >= 16 and block_size_n & (block_size_n - 1) == 0, f"block_size_n={block_size_n}"

    if num_splits > 1:
        part_max = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_nope.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(B, H, num_splits, R, dtype=torch.float32, device=q_nope.device)
    else:
        part_max = part_sum = part_acc = out  # unused
    block_r = _block(R)
    # float32 operands on the CPU (the interpreter): exact for bf16/fp16 inputs, as the GPU's fp32 accumulation
    dot_in_fp32 = q_nope.dtype == torch.float32 or not q_nope.is_cuda
    _mla_decode_split_kernel[(B, num_head_groups, num_splits)](
        q_nope, q_pe, kv_cache, block_tables, seq_lens,
        out, part_max, part_sum, part_acc,
        H, num_splits, softmax_scale * math.log2(math.e),
        q_nope.stride(0), q_nope.stride(1),
        q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        KV_LORA_RANK=R, ROPE_DIM=P, PAGE_SIZE=page_size,
        BLOCK_SIZE_H=block_h, BLOCK_SIZE_R=block_r, BLOCK_SIZE_P=_block(P), BLOCK_SIZE_N=block_size_n,
        DOT_PRECISION="ieee" if dot_in_fp32 else "tf32", DOT_IN_FP32=dot_in_fp32, WRITE_OUTPUT=num_splits == 1,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _mla_decode_merge_kernel[(B, H)](
            part_max, part_sum, part_acc, out,
            H, num_splits,
            out.stride(0), out.stride(1),
            KV_LORA_RANK=R, BLOCK_SIZE_R=block_r,
            num_warps=4,
        )
    return out
