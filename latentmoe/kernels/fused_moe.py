"""Routed experts: ``Σ_k w[t, k] · down_e(silu(gate_e(x_t)) * up_e(x_t))`` for e = ids[t, k].

Expert weights are stacked: ``w13 [E, 2I, D]`` (gate rows then up rows, as in
``gate_proj`` / ``up_proj`` of the checkpoint) and ``w2 [E, D, I]`` (``down_proj``).
``topk_ids`` holds local expert indices in ``[0, E)``; ``-1`` marks a slot that
is not computed here (its expert lives on another shard), and its weight is ignored.

Legend: T tokens, K slots per token, E experts, D hidden, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
