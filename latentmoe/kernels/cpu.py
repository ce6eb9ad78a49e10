"""The CPU's kernels (Numba): MLA decode over the paged latent cache as it lies, and the routed experts of a
small batch.

**MLA decode.** The torch reference (``mla_decode_ref``) gathers every sequence's blocks into a padded copy,
then reads that copy twice (scores, then the weighted sum). On the CPU that memory traffic is the cost: the copy
alone was a quarter of a batch-16 decode step here. This kernel reads each block where it is, once for its
scores and once more while it is still in cache for the weighted sum, with an online softmax per block (as the
Triton kernel does on GPUs). Same contract as the reference.

**Routed experts.** A decode step gives each expert a few rows (batch 16, top-4 of 16 experts: about 4), and a
matmul of a few rows against an expert's weights is bound by reading the weights, which MKL's small-M path
does at a fraction of this core's bandwidth. So the experts with at most ``SMALL_EXPERT_ROWS`` rows run here,
all in one call (gate/up, SiLU, down), on weights stored by columns (``kernels.lay_out_experts``, which
``set_kernels`` applies): each weight row is read once, in memory order, and added into the sums of every row
of the expert (a contiguous, vectorized loop with no reduction across lanes). One expert of the bench
checkpoint (1.5 MB) at 4 rows: 126 us, where dot products along the rows of the usual layout took 210 and
the reference 294-314 (``benchmarks/bench_cpu_experts.py``). The other experts keep torch's matmuls. The
grouping of (token, expert) pairs and the weighted sum are Numba loops too: as a dozen small torch ops they took
a third of a decode step's expert time. Same contract as ``fused_moe_ref``.

**Dense projections.** ``packed_linear`` is ``F.linear`` through PyTorch's oneDNN on a weight prepacked once
(MKL's sgemm repacks it on every call); ``model.Linear`` takes it by injection.

The Numba kernels are float32 only (other dtypes take the references). Numba compiles them to machine code once
(``warm_up``, when an engine or shard sets its kernels), cached under ``$LATENTMOE_CACHE/numba``
(``NUMBA_CACHE_DIR`` if set) for the next process. They hold no GIL. The MLA decode splits its batch across
``torch.get_num_threads()`` threads of our own (not Numba's parallel layer, whose default cannot take calls
from two threads at once, as a shard's two micro-batch lanes make); the routed experts run here on one torch
thread only (a shard's), and take the reference with more (see ``fused_moe_cpu``).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from latentmoe.kernels import experts_by_columns
from latentmoe.kernels.reference import fused_moe_ref, mla_decode_ref
from latentmoe.paths import cache_root

# compiled kernels go under latentmoe's cache (read by numba at its import), not next to an installed package
os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_root() / "numba"))
from numba import njit  # noqa: E402

__all__ = ["fused_moe_cpu", "mla_decode_cpu", "packed_linear"]

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


# Experts with at most this many rows run in the Numba kernel, in even chunks of at most ``CHUNK_ROWS`` rows (each
# chunk reads the expert's weights once; more rows per pass cost more in writes to their sums than a second read
# saves). ``benchmarks/bench_cpu_experts.py``, 8 experts of the bench checkpoint (1.5 MB each), one core, at 1, 4,
# 6, 8, 12 rows each: 57, 126, 152, 249, 246 us per expert (the previous kernel, dot products along the weights'
# rows: 142, 210, 223, 243, 321); from 16 rows torch's matmul on the same layout is as fast (373 against 390)
SMALL_EXPERT_ROWS = 12
CHUNK_ROWS = 6


@njit(nogil=True, cache=True)
def _group_pairs(ids, num_experts):  # pragma: no cover (compiled)
    """The (token, slot) pairs of ``ids [T, K]`` (slots on this shard, -1 = elsewhere) grouped by expert, in
    token order within each: -> counts [E], starts [E], pairs [P] (flat index t * K + k)."""
    T, K = ids.shape
    counts = np.zeros(num_experts, dtype=np.int64)
    for t in range(T):
        for k in range(K):
            if ids[t, k] >= 0:
                counts[ids[t, k]] += 1
    starts = np.empty(num_experts, dtype=np.int64)
    run = 0
    for e in range(num_experts):
        starts[e] = run
        run += counts[e]
    fill = starts.copy()
    pairs = np.empty(run, dtype=np.int64)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e >= 0:
                pairs[fill[e]] = t * K + k
                fill[e] += 1
    return counts, starts, pairs


@njit(fastmath=True, nogil=True, cache=True)
def _times_columns(rows, n, wt, out):  # pragma: no cover (compiled)
    """``out[i] = rows[i] @ wt`` for the first ``n`` rows, ``wt [depth, width]`` (a weight by columns): each row of
    ``wt`` is read once, from memory in order, and added into every row's sums (contiguous: vectorized)."""
    depth, width = wt.shape
    for i in range(n):
        for j in range(width):
            out[i, j] = np.float32(0.0)
    for k in range(depth):
        wk = wt[k]
        for i in range(n):
            a = rows[i, k]
            o = out[i]
            for j in range(width):
                o[j] += a * wk[j]


@njit(fastmath=True, nogil=True, cache=True)
def _small_experts(x, K, w13t, w2t, experts, starts, counts, pairs, ys):  # pragma: no cover (compiled)
    """For each listed expert e, its pairs ``j`` in ``starts[e] : starts[e] + counts[e]`` (token
    ``pairs[j] // K`` of ``x [T, D]``) -> ``ys[j]``: down(silu(gate(x)) * up(x)), in even chunks of at most
    ``CHUNK_ROWS``; ``w13t [E, D, 2I]`` (gate columns, then up columns), ``w2t [E, I, D]``."""
    D = x.shape[1]
    two_i = w13t.shape[2]
    inter = two_i // 2
    rows = np.empty((CHUNK_ROWS, D), dtype=np.float32)
    h = np.empty((CHUNK_ROWS, two_i), dtype=np.float32)
    act = np.empty((CHUNK_ROWS, inter), dtype=np.float32)
    for e in experts:
        first, n = starts[e], counts[e]
        chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
        size = (n + chunks - 1) // chunks
        for c in range(first, first + n, size):
            m = min(size, first + n - c)
            for i in range(m):
                rows[i] = x[pairs[c + i] // K]
            _times_columns(rows, m, w13t[e], h)
            for i in range(m):
                for j in range(inter):
                    g = h[i, j]
                    act[i, j] = g / (np.float32(1.0) + math.exp(-g)) * h[i, inter + j]
            _times_columns(act, m, w2t[e], ys[c : c + m])


@njit(nogil=True, cache=True)
def _combine(ys, weights, pairs, T, K):  # pragma: no cover (compiled)
    """``out [T, D]``: row ``ys[j]`` (pair ``pairs[j]``) weighted by ``weights[pairs[j]]`` and added to its
    token's row, in the order of ``pairs`` (grouped by expert)."""
    D = ys.shape[1]
    out = np.zeros((T, D), dtype=np.float32)
    for j in range(len(pairs)):
        p = pairs[j]
        row, y, w = out[p // K], ys[j], weights[p]
        for d in range(D):
            row[d] += y[d] * w
    return out


def fused_moe_cpu(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_ids: torch.Tensor,  # [T, K] int, -1 = skip
    topk_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:  # [T, D]
    """``fused_moe_ref``'s contract: grouping, experts with few rows and the weighted sum in Numba, the other
    experts with torch's matmuls (float32 on the CPU, one torch thread, the weights by columns as
    ``lay_out_experts`` leaves them; anything else goes to the reference).

    With more torch threads the reference runs: MKL threads each matmul, and the single-process engine with
    two threads here made 552 and 527 tok/s with the kernel (its version on rows, before the layout by columns;
    not measured since) against 616 and 607 with the reference (16 prompts, 128 in / 64 out, the bench
    checkpoint; 875 / 900 against 960 / 989 at 64), the Numba MLA decode in both. On one thread (a shard's) the
    kernel wins: an expert shard's 8 experts of the bench checkpoint at 16 tokens took 0.86 ms per layer, the
    reference 2.49 (``benchmarks/bench_cpu_experts.py``)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w13.dtype != torch.float32
            or not experts_by_columns(w13, w2) or torch.get_num_threads() > 1):
        return fused_moe_ref(x, w13, w2, topk_ids, topk_weights)
    T, D = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    assert w13.shape[2] == D and w2.shape == (E, D, inter), f"{tuple(w13.shape)} {tuple(w2.shape)} D={D}"
    K = topk_ids.shape[1]
    x_np = x.detach().contiguous().numpy()
    counts, starts, pairs = _group_pairs(topk_ids.detach().to(torch.int64).contiguous().numpy(), E)
    ys = np.empty((len(pairs), D), dtype=np.float32)  # row j: the token of pairs[j] through its expert
    small = np.flatnonzero((counts > 0) & (counts <= SMALL_EXPERT_ROWS))
    if len(small):
        _small_experts(x_np, K, w13.detach().transpose(1, 2).numpy(), w2.detach().transpose(1, 2).numpy(), small,
                       starts, counts, pairs, ys)
    large = np.flatnonzero(counts > SMALL_EXPERT_ROWS)
    if len(large):
        xs, ys_t = x[torch.from_numpy(pairs) // K], torch.from_numpy(ys)  # [P, D]: every pair's row, in one gather
        for e in large.tolist():
            first, n = int(starts[e]), int(counts[e])
            h = F.linear(xs[first : first + n], w13[e])  # [n, 2I]
            act = F.silu(h[:, :inter], inplace=True).mul_(h[:, inter:])  # [n, I]
            torch.mm(act, w2[e].t(), out=ys_t[first : first + n])
    weights = topk_weights.detach().to(torch.float32).reshape(-1).contiguous().numpy()
    return torch.from_numpy(_combine(ys, weights, pairs, T, K))


# weights of at least this many elements take oneDNN's prepacked product; below it F.linear's lighter call wins
# (one core, per call, F.linear against packed: 64 KiB 17.5 against 22.9 us at 16 rows; 256 KiB 67 against 43)
PACKED_LINEAR_MIN_ELEMENTS = 1 << 16


def packed_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> F.linear(x, weight)`` computed by oneDNN on a copy of ``weight`` laid out once in its blocked format,
    or None where that does not pay (not float32 on the CPU, smaller than ``PACKED_LINEAR_MIN_ELEMENTS``, a meta
    tensor, a torch without oneDNN).

    F.linear goes to MKL's sgemm, which repacks the weight on every call; at a decode step's few rows that
    bounds it at about 5 GB/s of weight here (5.3 GB/s, 96 weights of the bench checkpoint's shapes, one
    thread, 16 rows), where oneDNN's product on the prepacked copy reads 8.2 (1.2x to 1.7x faster from 1 to
    1024 rows). This is PyTorch's own oneDNN linear (``torch.ops.mkldnn``, what Inductor's freezing puts in
    a compiled CPU graph). The copy is taken now: a weight changed afterwards needs ``set_kernels`` again."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2
            or weight.numel() < PACKED_LINEAR_MIN_ELEMENTS or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # laid out for about 32 rows

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return F.linear(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    return linear


def warm_up() -> None:
    """Compile both kernels for the argument types the engine passes (or load them from Numba's cache), so that
    no step pays for it: a shard's first step would otherwise hold up its whole collective group for seconds."""
    cache = torch.zeros(2, 2, 3)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    mla_decode_cpu(torch.zeros(1, 1, 2), torch.zeros(1, 1, 1), cache, tables, lens, 1.0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    fused_moe_cpu(torch.zeros(1, 2), torch.zeros(1, 2, 2).transpose(1, 2), torch.zeros(1, 1, 2).transpose(1, 2), ids,
                  torch.ones(1, 1))
