"""The pure-torch references of the kernels' ops: the CPU defaults, and what the kernels are tested against.

No triton import here, so the model package (and any machine without triton) can use them.
``latentmoe.kernels.mla_decode`` and ``latentmoe.kernels.fused_moe`` re-export them next to their kernels.

Legend: B batch, H heads, R kv_lora_rank, P rope dims, N blocks, S block size;
T tokens, K slots per token, E experts, D hidden, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mla_decode_ref(
    q_nope: torch.Tensor,  # [B, H, R]  (already multiplied by W_UK)
    q_pe: torch.Tensor,  # [B, H, P]  (rotated)
    kv_cache: torch.Tensor,  # [N, S, R + P]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int
    softmax_scale: float,
) -> torch.Tensor:  # [B, H, R]
    """Pure-torch reference: gathers every sequence's latents (padded to whole blocks of the longest) and attends in
    float32, the whole batch in one matmul each for scores and output (padding masked out before the softmax).

    Written for the CPU's memory traffic, which is its cost: one ``index_select`` of the blocks (a third of
    advanced indexing's time), the rope part of the query next to its latent part so one matmul scores both
    against the gathered rows as they lie, and only the padding rows zeroed (a cache may hold NaN there, and
    0 * NaN would reach the output), not a pass over all of them."""
    B, H, R = q_nope.shape
    P = q_pe.shape[-1]
    assert kv_cache.shape[-1] == R + P, f"cache width {kv_cache.shape[-1]} != {R} + {P}"
    if B == 0:
        return q_nope.new_empty(0, H, R)
    block_size = kv_cache.shape[1]
    lens = seq_lens.to(device=q_nope.device, dtype=torch.long)  # [B]
    num_blocks = -(-int(lens.max()) // block_size)
    L = num_blocks * block_size
    tables = block_tables[:, :num_blocks].long().clamp(min=0).flatten()  # entries past a sequence's end: any block
    latents = kv_cache.index_select(0, tables).view(B, L, R + P)  # a copy (the gather's)
    if latents.dtype != torch.float32:
        latents = latents.float()
    pad = torch.arange(L, device=q_nope.device) >= lens[:, None]  # [B, L]
    latents.view(B * L, R + P).index_fill_(0, pad.flatten().nonzero().flatten(), 0.0)
    q = torch.cat([q_nope.float(), q_pe.float()], dim=-1)  # [B, H, R+P]
    scores = (q @ latents.transpose(1, 2)).mul_(softmax_scale)  # [B, H, L]
    probs = torch.softmax(scores.masked_fill_(pad[:, None, :], float("-inf")), dim=-1)
    return (probs @ latents[..., :R]).to(q_nope.dtype)


def fused_moe_ref(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_ids: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:  # [T, D]
    """Pure-torch reference: tokens grouped by expert, one matmul pair per expert present.

    The gather of the rows, the routing weights and the scatter back are done once for all experts, each expert's
    rows a slice of them; per expert only its two matmuls and the activation run (on CPU each op costs a few
    microseconds of dispatch, and a step runs this for every expert of every MoE layer)."""
    T, D = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    assert w13.shape[2] == D and w2.shape == (E, D, inter), f"{tuple(w13.shape)} {tuple(w2.shape)} D={D}"
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    K = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    skip = int((sorted_ids < 0).sum())
    order = order[skip:]  # flat (token, slot) indices of the pairs computed here, grouped by expert
    counts = torch.bincount(sorted_ids[skip:], minlength=E).tolist()
    tokens = order // K
    xs = x[tokens]  # [P, D]
    ys = torch.empty_like(xs)  # [P, D]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = F.linear(xs[start : start + n], w13[e])  # [n, 2I]
        act = F.silu(h[:, :inter], inplace=True).mul_(h[:, inter:])  # [n, I]
        torch.mm(act, w2[e].t(), out=ys[start : start + n])
        start += n
    out.index_add_(0, tokens, ys.float().mul_(topk_weights.reshape(-1)[order, None].float()))
    return out.to(x.dtype)
