"""MLA decode over the paged latent cache.

Absorbed queries attend in latent space: for each sequence b and head h,
``score[t] = q_nope[b, h] · c_kv[t] + q_pe[b, h] · k_pe[t]`` over the sequence's
cached tokens, and ``out[b, h] = Σ_t softmax(score * scale)[t] c_kv[t]``.
The cache is ``[num_blocks, block_size, kv_lora_rank + rope]`` (``[c_kv | k_pe]``
per token); ``block_tables[b, i]`` is the i-th block of sequence b.

Legend: B batch, H heads, R kv_lora_rank, P rope dims, N blocks, S block size.
"""

from __future__ import annotations

import torch


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
