"""Routed experts: ``Σ_k w[t, k] · down_e(silu(gate_e(x_t)) * up_e(x_t))`` for e = ids[t, k].

Expert weights are stacked: ``w13 [E, 2I, D]`` (gate rows then up rows, as in
``gate_proj`` / ``up_proj`` of the checkpoint) and ``w2 [E, D, I]`` (``down_proj``).
``topk_ids`` holds local expert indices in ``[0, E)``; ``-1`` marks a slot that
is not computed here (its expert lives on another shard), and its weight is ignored.

The Triton path sorts the (token, slot) pairs by expert, pads each expert's run to whole
blocks of ``BLOCK_SIZE_M`` rows (``moe_align_block_size``), and runs two grouped matrix
products over those blocks: gate/up with ``silu(gate) * up``, then down with the routing
weight. The K slots of each token are then summed.

Legend: T tokens, K slots per token, E experts, D hidden, I expert width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentmoe.kernels.reference import fused_moe_ref  # noqa: F401  (re-exported: the reference of this op)

__all__ = ["fused_moe", "fused_moe_ref", "moe_align_block_size", "moe_config"]


@triton.jit
def _moe_gate_up_kernel(
    # pointers
    x_ptr, w13_ptr, h_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
    # sizes
    num_pairs, top_k, hidden_size, inter_size,
    # strides
    stride_x_t, stride_w13_e, stride_w13_n, stride_h_p,
    # meta-parameters
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """One (block of sorted pairs, tile of I): ``h[pair] = silu(x[token] @ gate.T) * (x[token] @ up.T)``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a block past the last expert's padded rows
        return
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m)  # [BM] flat (token, slot) index; num_pairs = padding
    mask_m = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    x_ptrs = x_ptr + token[:, None] * stride_x_t + offs_k[None, :]  # [BM, BK]
    gate_ptrs = w13_ptr + expert * stride_w13_e + offs_n[None, :] * stride_w13_n + offs_k[:, None]  # [BK, BN]
    up_ptrs = gate_ptrs + inter_size * stride_w13_n
    gate = tl.zeros([BLOCK_SIZE_M, BLOCK_SIZE_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_SIZE_M, BLOCK_SIZE_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden_size, BLOCK_SIZE_K)):
        mask_k = offs_k < hidden_size - k * BLOCK_SIZE_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_gate = tl.load(gate_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w_up = tl.load(up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
            x = x.to(tl.float32)
            w_gate = w_gate.to(tl.float32)
            w_up = w_up.to(tl.float32)
        gate = tl.dot(x, w_gate, gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, w_up, up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_SIZE_K
        gate_ptrs += BLOCK_SIZE_K
        up_ptrs += BLOCK_SIZE_K

    h = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up, [BM, BN]
    tl.store(h_ptr + pair[:, None].to(tl.int64) * stride_h_p + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _moe_down_kernel(
    # pointers
    h_ptr, w2_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, topk_weights_ptr,
    # sizes
    num_pairs, hidden_size, inter_size,
    # strides
    stride_h_p, stride_w2_e, stride_w2_n, stride_out_p,
    # meta-parameters
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """One (block of sorted pairs, tile of D): ``out[pair] = weight[pair] · h[pair] @ down.T`` in float32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)  # [BM]
    mask_m = pair < num_pairs
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < hidden_size
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    h_ptrs = h_ptr + pair[:, None] * stride_h_p + offs_k[None, :]  # [BM, BK]
    w_ptrs = w2_ptr + expert * stride_w2_e + offs_n[None, :] * stride_w2_n + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_SIZE_M, BLOCK_SIZE_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(inter_size, BLOCK_SIZE_K)):
        mask_k = offs_k < inter_size - k * BLOCK_SIZE_K
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_down = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w_down = w_down.to(tl.float32)
        acc = tl.dot(h, w_down, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_SIZE_K
        w_ptrs += BLOCK_SIZE_K

    weight = tl.load(topk_weights_ptr + pair, mask=mask_m, other=0.0)  # [BM] float32
    tl.store(out_ptr + pair[:, None] * stride_out_p + offs_n[None, :], acc * weight[:, None],
             mask=mask_m[:, None] & mask_n[None, :])


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, K] int, -1 = skip
    block_size_m: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert, each expert's run padded to a multiple of ``block_size_m``.

    Returns ``sorted_pair_ids [num_blocks * block_size_m]`` (flat pair index ``t * K + k``; padding
    holds ``T * K``) and ``block_expert_ids [num_blocks]`` (the expert of each block, -1 for the unused
    blocks at the end). ``num_blocks`` is an upper bound known without reading the ids back (no host
    sync): ``ceil((T·K + min(E, T·K)·(block_size_m - 1)) / block_size_m)``.
    """
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    E, BM = num_experts, block_size_m
    num_blocks = triton.cdiv(num_pairs + min(E, num_pairs) * (BM - 1), BM)
    capacity = num_blocks * BM
    expert_of_pair = topk_ids.reshape(-1).long()
    expert_of_pair = torch.where(expert_of_pair < 0, E, expert_of_pair)  # skipped slots: bucket E, sorted last
    # scatter_add rather than bincount: bincount on CUDA reads the max back to the host
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(
        0, expert_of_pair, torch.ones_like(expert_of_pair))  # [E + 1]
    padded_counts = (counts[:E] + BM - 1) // BM * BM  # [E]
    padded_ends = torch.cumsum(padded_counts, 0)  # [E]
    # bucket E (skipped pairs) lands past `capacity`, in a tail that is cut off
    padded_starts = torch.cat([padded_ends - padded_counts, padded_ends.new_full((1,), capacity)])  # [E + 1]
    starts = torch.cumsum(counts, 0) - counts  # [E + 1]
    order = torch.argsort(expert_of_pair, stable=True)  # [T*K] pairs by expert
    sorted_experts = expert_of_pair[order]
    rank = torch.arange(num_pairs, device=device) - starts[sorted_experts]  # position within its expert's run
    sorted_pair_ids = torch.full((capacity + num_pairs,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[padded_starts[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * BM
    block_expert_ids = torch.searchsorted(padded_ends, block_starts, right=True)  # [num_blocks]
    block_expert_ids = torch.where(block_expert_ids < E, block_expert_ids, -1).to(torch.int32)
    return sorted_pair_ids[:capacity], block_expert_ids


def moe_config(num_pairs: int, num_experts: int) -> dict:
    """Tile sizes for ``num_pairs`` (token, expert) pairs over ``num_experts`` experts.

    Few pairs per expert (decode) is a weight-streaming problem: short blocks of rows, wide K
    tiles. Many pairs (prefill) is a matrix product: square tiles, more warps. Not yet tuned on
    a GPU; ``benchmarks/bench_kernels.py --sweep`` times the alternatives.
    """
    pairs_per_expert = num_pairs / max(num_experts, 1)
    if pairs_per_expert <= 16:
        return dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, num_warps=4, num_stages=3)
    if pairs_per_expert <= 64:
        return dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, num_warps=8, num_stages=3)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_moe(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_ids: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
    *,
    config: dict | None = None,
) -> torch.Tensor:  # [T, D]
    """Triton routed experts; same contract as ``fused_moe_ref``.

    Pairs are sorted by expert (``moe_align_block_size``); one launch computes
    ``h = silu(x @ gate.T) * (x @ up.T)`` for every pair, one more ``weight · h @ down.T``, and the
    K slots of each token are summed in float32. ``config`` overrides ``moe_config``'s tiles.
    Ids must lie in ``[-1, E)`` (not checked on the device).
    """
    T, D = x.shape
    assert w13.dim() == 3 and w2.dim() == 3, f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} must be 3-d"
    E, two_i, _ = w13.shape
    inter = two_i // 2
    assert w13.shape == (E, 2 * inter, D) and w2.shape == (E, D, inter), \
        f"w13 {tuple(w13.shape)} must be [E, 2I, D], w2 {tuple(w2.shape)} [E, D, I], with D={D}"
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_weights.shape == topk_ids.shape, \
        f"topk_ids {tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)} must both be [T={T}, K]"
    assert x.dtype in _DTYPES and w13.dtype == w2.dtype == x.dtype, \
        f"x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}: one of {_DTYPES} for all three"
    assert not topk_ids.is_floating_point() and topk_weights.is_floating_point(), \
        f"topk_ids {topk_ids.dtype} must be integer, topk_weights {topk_weights.dtype} floating"
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        assert t.stride(-1) == 1, f"{name} needs a contiguous last dim, has strides {t.stride()}"
    devices = {t.device for t in (x, w13, w2, topk_ids, topk_weights)}
    assert len(devices) == 1, f"inputs on several devices: {devices}"

    K = topk_ids.shape[1]
    num_pairs = T * K
    if num_pairs == 0 or E == 0:
        return torch.zeros(T, D, dtype=x.dtype, device=x.device)
    config = dict(moe_config(num_pairs, E), **(config or {}))
    BM, BN, BK = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    assert min(BM, BN, BK) >= 16, f"tiles {BM}x{BN}x{BK}: tl.dot needs 16 or more in each"
    launch = dict(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    dot_in_fp32 = x.dtype == torch.float32 or not x.is_cuda  # see mla_decode
    precision = "ieee" if dot_in_fp32 else "tf32"

    sorted_pair_ids, block_expert_ids = moe_align_block_size(topk_ids, BM, E)
    num_blocks = block_expert_ids.numel()
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [T*K, I]; skipped rows never read
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, BN))](
        x, w13, h, sorted_pair_ids, block_expert_ids,
        num_pairs, K, D, inter,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_SIZE_M=BM, BLOCK_SIZE_N=BN, BLOCK_SIZE_K=BK, DOT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32,
        **launch,
    )
    out_pairs = torch.zeros(num_pairs, D, dtype=torch.float32, device=x.device)  # [T*K, D]; skipped rows stay 0
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [T*K]
    _moe_down_kernel[(num_blocks, triton.cdiv(D, BN))](
        h, w2, out_pairs, sorted_pair_ids, block_expert_ids, weights,
        num_pairs, D, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out_pairs.stride(0),
        BLOCK_SIZE_M=BM, BLOCK_SIZE_N=BN, BLOCK_SIZE_K=BK, DOT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32,
        **launch,
    )
    return out_pairs.view(T, K, D).sum(dim=1).to(x.dtype)
