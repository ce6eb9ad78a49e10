"""MLA decode: the Triton kernel against ``mla_decode_ref`` (interpreter on the CPU, real shapes on a GPU)."""

from __future__ import annotations

import pytest
import torch

from latentmoe.kernels.mla_decode import mla_decode, mla_decode_ref, num_decode_splits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_inputs(seq_lens, *, heads, rank, rope, block_size, dtype, seed, device=DEVICE, extra_blocks=3):
    """Random queries and a paged cache whose blocks are handed out in shuffled order.

    Block-table entries past each sequence's last block hold -1: the kernel must never read them.
    """
    gen = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(blocks_per_seq), 1)
    num_blocks = sum(blocks_per_seq) + extra_blocks
    kv_cache = torch.randn(num_blocks, block_size, rank + rope, generator=gen)
    q_nope = torch.randn(B, heads, rank, generator=gen)
    q_pe = torch.randn(B, heads, rope, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    to = dict(device=device)
    return (q_nope.to(dtype=dtype, **to), q_pe.to(dtype=dtype, **to), kv_cache.to(dtype=dtype, **to),
            block_tables.to(**to), seq_lens.to(**to))


# (seq_lens, heads, rank, rope, block_size, num_splits, softmax_scale); None scale = 1/sqrt(R + P)
CASES = {
    "batch1_one_token": ([1], 4, 32, 8, 4, None, None),
    "lens_not_block_multiple": ([1, 13, 30, 7], 4, 32, 8, 8, None, None),
    "splits_some_empty": ([1, 13, 30, 7], 4, 32, 8, 8, 3, None),
    "block_multiple_odd_heads_rank": ([32, 16], 3, 24, 8, 16, 2, None),
    "two_heads_rank48": ([9, 40], 2, 48, 8, 4, 4, None),
    "block_size_not_pow2": ([17, 6], 4, 32, 8, 6, 2, None),
    "two_head_groups": ([11, 5], 18, 16, 8, 4, 1, None),
    "sharp_softmax": ([25, 3], 4, 32, 8, 4, 2, 2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    seq_lens, H, R, P, S, num_splits, scale = CASES[case]
    seed = list(CASES).index(case) * 2 + (dtype == torch.bfloat16)
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs(seq_lens, heads=H, rank=R, rope=P, block_size=S,
                                                             dtype=dtype, seed=seed)
    scale = scale or (R + P) ** -0.5
    out = mla_decode(q_nope, q_pe, kv_cache, block_tables, lens, scale, num_splits=num_splits)
    ref = mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, lens, scale)
    assert out.dtype == dtype and out.shape == (len(seq_lens), H, R)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


def test_strided_queries():
    """q_nope and q_pe as views into one [B, H, R + P] tensor (row stride R + P, not R)."""
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs([10, 3], heads=4, rank=32, rope=8, block_size=4,
                                                             dtype=torch.float32, seed=100)
    q = torch.cat([q_nope, q_pe], dim=-1)
    q_nope, q_pe = q[..., :32], q[..., 32:]
    assert not q_nope.is_contiguous()
    out = mla_decode(q_nope, q_pe, kv_cache, block_tables, lens, 0.2, num_splits=2)
    torch.testing.assert_close(out, mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, lens, 0.2),
                               **TOLERANCE[torch.float32])


def test_num_splits_fills_the_device():
    assert num_decode_splits(1, 1, 32768, 132) == 64  # one long sequence: capped
    assert num_decode_splits(1, 1, 1024, 132) == 4  # short: no split under 256 tokens
    assert num_decode_splits(128, 1, 4096, 132) == 3
    assert num_decode_splits(512, 1, 4096, 132) == 1
    assert num_decode_splits(4, 1, 1, 132) == 1


def test_launcher_checks_shapes_and_dtypes():
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs([5], heads=4, rank=32, rope=8, block_size=4,
                                                             dtype=torch.float32, seed=7)
    with pytest.raises(AssertionError, match="kv_cache"):
        mla_decode(q_nope, q_pe, kv_cache[..., :-1], block_tables, lens, 0.1)
    with pytest.raises(AssertionError, match="bfloat16"):
        mla_decode(q_nope, q_pe, kv_cache.bfloat16(), block_tables, lens, 0.1)
    with pytest.raises(AssertionError, match="contiguous last dim"):
        mla_decode(q_nope.transpose(1, 2).contiguous().transpose(1, 2), q_pe, kv_cache, block_tables, lens, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seq_lens", [[1], [4096], [1, 63, 64, 65, 1000, 2049, 777, 3]])
def test_deepseek_v2_lite_shapes_gpu(seq_lens):
    """16 heads, kv_lora_rank 512, rope 64, block size 64, bf16, splits chosen by the launcher."""
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs(seq_lens, heads=16, rank=512, rope=64, block_size=64,
                                                             dtype=torch.bfloat16, seed=len(seq_lens))
    out = mla_decode(q_nope, q_pe, kv_cache, block_tables, lens, 576 ** -0.5)
    torch.testing.assert_close(out, mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, lens, 576 ** -0.5),
                               **TOLERANCE[torch.bfloat16])


def test_reference_batched_matches_one_sequence_at_a_time():
    """The reference pads the batch to its longest sequence: padding (and NaN in unused cache slots) changes
    nothing against attending sequence by sequence."""
    seq_lens, H, R, P, S = [1, 13, 30, 7, 16], 4, 32, 8, 8
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs(seq_lens, heads=H, rank=R, rope=P, block_size=S,
                                                             dtype=torch.float32, seed=99, device="cpu")
    for b, n in enumerate(seq_lens):  # poison each sequence's last block past its end
        if n % S:
            kv_cache[block_tables[b, (n - 1) // S], n % S :] = float("nan")
    out = mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, lens, 0.3)
    for b, n in enumerate(seq_lens):
        one = mla_decode_ref(q_nope[b : b + 1], q_pe[b : b + 1], kv_cache, block_tables[b : b + 1], lens[b : b + 1], 0.3)
        latents = kv_cache[block_tables[b, : -(-n // S)].long()].reshape(-1, R + P)[:n]
        probs = torch.softmax((q_nope[b] @ latents[:, :R].T + q_pe[b] @ latents[:, R:].T) * 0.3, dim=-1)
        torch.testing.assert_close(out[b], probs @ latents[:, :R], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[b : b + 1], one, atol=1e-5, rtol=1e-5)
    assert mla_decode_ref(q_nope[:0], q_pe[:0], kv_cache, block_tables[:0], lens[:0], 0.3).shape == (0, H, R)
