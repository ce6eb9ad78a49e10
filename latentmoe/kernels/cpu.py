"""MLA decode on the CPU, over the paged latent cache as it lies: a Numba kernel and its launcher.

The torch reference (``mla_decode_ref``) gathers every sequence's blocks into a padded copy, then reads that copy
twice (scores, then the weighted sum). On the CPU that memory traffic is the cost: the copy alone was a quarter
of a batch-16 decode step here. This kernel reads each block where it is, once for its scores and once more
while it is still in cache for the weighted sum, with an online softmax per block (as the Triton kernel does on
GPUs). Same contract as the reference; float32 only (other dtypes take the reference).

Numba compiles it to machine code on first use (cached next to this file where that is writable). The kernel
holds no GIL: a batch is split across ``torch.get_num_threads()`` threads of our own (not Numba's parallel
layer, whose default cannot take calls from two threads at once, as a shard's two micro-batch lanes make).
"""

from __future__ import annotations

import concurrent.futures
import math
import threading

import numpy as np
import torch
from numba import njit

from latentmoe.kernels.reference import mla_decode_ref

__all__ = ["mla_decode_cpu"]

# a thread takes at least this many sequences (fewer are not worth a hand-off)
MIN_SEQS_PER_THREAD = 4


@njit(fastmath=True, nogil=True, cache=True)
def _decode(q, cache, tables, lens, scale, out, first, last):  # pragma: no cover (compiled)
    """Sequences ``first..last-1``: q [B, H, R+P], cache [N, S, R+P], tables [B, max_blocks], lens [B],
    out [B, H, R]. Rows at or past a sequence's length, and table entries past its last block, are never read."""
    H, W = q.shape[1], q.shape[2]
    S = cache.shape[1]
    R = out.shape[2]
    m = np.empty(H, dtype=np.float32)  # running max of the scores, per head
    lsum = np.empty(H, dtype=np.float32)  # running sum of exp(score - max)
    acc = np.empty((H, R), dtype=np.float32)
    p = np.empty((H, S), dtype=np.float32)  # one block's scores, then their exponentials
    for b in range(first, last):
        n = lens[b]
        m[:] = -np.inf
        lsum[:] = 0.0
        acc[:] = 0.0
        qb = q[b]
        for j in range((n + S - 1) // S):
            block = cache[tables[b, j]]
            count = min(S, n - j * S)
            for t in range(count):
                row = block[t]
                for h in range(H):
                    dot = np.float32(0.0)
                    for k in range(W):
                        dot += qb[h, k] * row[k]
                    p[h, t] = dot * scale
            for h in range(H):
                new_max = m[h]
                for t in range(count):
                    new_max = max(new_max, p[h, t])
                total = np.float32(0.0)
                for t in range(count):
                    e = math.exp(p[h, t] - new_max)
                    p[h, t] = e
                    total += e
                if m[h] != -np.inf:
                    correction = math.exp(m[h] - new_max)
                    lsum[h] *= correction
                    for k in range(R):
                        acc[h, k] *= correction
                lsum[h] += total
                m[h] = new_max
            for t in range(count):
                row = block[t]
                for h in range(H):
                    w = p[h, t]
                    for k in range(R):
                        acc[h, k] += w * row[k]
        for h in range(H):
            inv = np.float32(1.0) / lsum[h]
            for k in range(R):
                out[b, h, k] = acc[h, k] * inv


_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (workers, pool)
_pool_lock = threading.Lock()


def _threads(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of at least ``n`` threads (one for the process, grown when asked for more)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] < n:
            _pool = (n, concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="latentmoe-mla"))
        return _pool[1]


def mla_decode_cpu(
    q_nope: torch.Tensor,  # [B, H, R]  (already multiplied by W_UK)
    q_pe: torch.Tensor,  # [B, H, P]  (rotated)
    kv_cache: torch.Tensor,  # [N, S, R + P]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int
    softmax_scale: float,
) -> torch.Tensor:  # [B, H, R]
    """``mla_decode_ref``'s contract, computed in place over the paged cache (float32 on the CPU; anything else
    goes to the reference)."""
    B, H, R = q_nope.shape
    if (kv_cache.device.type != "cpu" or kv_cache.dtype != torch.float32 or q_nope.dtype != torch.float32
            or not kv_cache.is_contiguous()):
        return mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, seq_lens, softmax_scale)
    assert kv_cache.shape[-1] == R + q_pe.shape[-1], f"cache width {kv_cache.shape[-1]} != {R} + {q_pe.shape[-1]}"
    out = torch.empty(B, H, R, dtype=torch.float32)
    if B == 0:
        return out
    q = torch.cat([q_nope, q_pe.float()], dim=-1).numpy()
    args = (q, kv_cache.numpy(), block_tables.contiguous().numpy(), seq_lens.contiguous().numpy(),
            np.float32(softmax_scale), out.numpy())
    threads = min(torch.get_num_threads(), B // MIN_SEQS_PER_THREAD)
    if threads <= 1:
        _decode(*args, 0, B)
        return out
    bounds = [B * i // threads for i in range(threads + 1)]
    pool = _threads(threads - 1)
    parts = [pool.submit(_decode, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    _decode(*args, bounds[0], bounds[1])
    for part in parts:
        part.result()
    return out
