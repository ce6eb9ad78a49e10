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
    """Pure-torch reference: gathers each sequence's latents and attends in float32."""
    B, H, R = q_nope.shape
    P = q_pe.shape[-1]
    assert kv_cache.shape[-1] == R + P, f"cache width {kv_cache.shape[-1]} != {R} + {P}"
    block_size = kv_cache.shape[1]
    out = torch.empty(B, H, R, dtype=q_nope.dtype, device=q_nope.device)
    for b in range(B):
        n = int(seq_lens[b])
        num_blocks = (n + block_size - 1) // block_size
        latents = kv_cache[block_tables[b, :num_blocks].long()].reshape(-1, R + P)[:n].float()  # [n, R+P]
        c_kv, k_pe = latents[:, :R], latents[:, R:]
        scores = q_nope[b].float() @ c_kv.T + q_pe[b].float() @ k_pe.T  # [H, n]
        probs = torch.softmax(scores * softmax_scale, dim=-1)
        out[b] = (probs @ c_kv).to(out.dtype)
    return out


def fused_moe_ref(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_ids: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:  # [T, D]
    """Pure-torch reference: tokens grouped by expert, one matmul pair per expert present."""
    T, D = x.shape
    E, two_i, _ = w13.shape
    assert w13.shape[2] == D and w2.shape == (E, D, two_i // 2), f"{tuple(w13.shape)} {tuple(w2.shape)} D={D}"
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    counts = torch.bincount(sorted_ids[sorted_ids >= 0], minlength=E).tolist()
    start = int((sorted_ids < 0).sum())
    K = topk_ids.shape[1]
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]  # flat (token, slot) indices
        start += n
        tokens = pairs // K
        gate, up = F.linear(x[tokens], w13[e]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(F.silu(gate) * up, w2[e])  # [n, D]
        out.index_add_(0, tokens, y.float() * topk_weights.reshape(-1)[pairs, None].float())
    return out.to(x.dtype)
