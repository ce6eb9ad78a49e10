"""Fused MoE: the Triton kernels against ``fused_moe_ref`` (interpreter on the CPU, real shapes on a GPU)."""

from __future__ import annotations

import pytest
import torch

from latentmoe.kernels.fused_moe import fused_moe, fused_moe_ref, moe_align_block_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the reference rounds gate, up, h and each expert's output to bf16; the kernel rounds h only
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}
SMALL_TILES = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16)


def make_inputs(T, K, E, D, inter, *, dtype, seed, routing="random", device=DEVICE):
    """Random activations, weights (scaled so activations stay O(1)), routing weights and expert ids.

    ``routing``: "random" (ids in [-1, E)), "skip_expert_1" (random, expert 1 never chosen),
    "one_expert" (every slot on expert E - 1), "all_skipped" (every id -1).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    w13 = torch.randn(E, 2 * inter, D, generator=gen) * D ** -0.5
    w2 = torch.randn(E, D, inter, generator=gen) * inter ** -0.5
    topk_weights = torch.rand(T, K, generator=gen) + 0.1
    topk_ids = torch.randint(-1, E, (T, K), generator=gen)
    if routing == "skip_expert_1":
        topk_ids[topk_ids == 1] = 0
    elif routing == "one_expert":
        topk_ids.fill_(E - 1)
    elif routing == "all_skipped":
        topk_ids.fill_(-1)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to), topk_ids.to(**to),
            topk_weights.to(**to))


# (T, K, E, D, I, routing, config); D and I not multiples of 16 hit the masks
CASES = {
    "one_token": (1, 2, 4, 40, 24, "random", SMALL_TILES),
    "expert_without_tokens": (9, 3, 4, 32, 40, "skip_expert_1", SMALL_TILES),
    "all_on_one_expert": (12, 2, 3, 24, 16, "one_expert", SMALL_TILES),
    "all_slots_skipped": (3, 2, 3, 32, 16, "all_skipped", SMALL_TILES),
    "many_tokens_default_tiles": (40, 2, 2, 48, 20, "random", None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    T, K, E, D, inter, routing, config = CASES[case]
    seed = list(CASES).index(case) * 2 + (dtype == torch.bfloat16)
    x, w13, w2, topk_ids, topk_weights = make_inputs(T, K, E, D, inter, dtype=dtype, seed=seed, routing=routing)
    out = fused_moe(x, w13, w2, topk_ids, topk_weights, config=config)
    ref = fused_moe_ref(x, w13, w2, topk_ids, topk_weights)
    assert out.dtype == dtype and out.shape == (T, D)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


def test_int32_ids_and_bf16_weights():
    x, w13, w2, topk_ids, topk_weights = make_inputs(5, 3, 4, 32, 16, dtype=torch.float32, seed=50)
    out = fused_moe(x, w13, w2, topk_ids.int(), topk_weights.bfloat16(), config=SMALL_TILES)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, topk_ids, topk_weights.bfloat16()),
                               **TOLERANCE[torch.float32])


def test_align_block_size():
    topk_ids = torch.tensor([[0, 2], [2, -1], [2, 0], [-1, -1], [3, 2]], device=DEVICE)  # expert 1: no pairs
    BM, E = 4, 4
    sorted_pair_ids, block_expert_ids = moe_align_block_size(topk_ids, BM, E)
    num_pairs = topk_ids.numel()
    assert sorted_pair_ids.numel() == block_expert_ids.numel() * BM
    assert block_expert_ids.tolist() == [0, 2, 3, -1, -1, -1]
    blocks = sorted_pair_ids.view(-1, BM).tolist()
    flat = topk_ids.reshape(-1).tolist()
    for expert, rows in zip(block_expert_ids.tolist(), blocks):
        real = [p for p in rows if p != num_pairs]
        assert all(flat[p] == expert for p in real), (expert, rows)
        assert rows == real + [num_pairs] * (BM - len(real))  # padding at the end of each block
    placed = sorted(p for rows in blocks for p in rows if p != num_pairs)
    assert placed == [p for p, e in enumerate(flat) if e >= 0]


def test_launcher_checks_shapes_and_dtypes():
    x, w13, w2, topk_ids, topk_weights = make_inputs(2, 2, 3, 32, 16, dtype=torch.float32, seed=9)
    with pytest.raises(AssertionError, match="w2"):
        fused_moe(x, w13, w2[:, :, :-1], topk_ids, topk_weights)
    with pytest.raises(AssertionError, match="bfloat16"):
        fused_moe(x, w13.bfloat16(), w2, topk_ids, topk_weights)
    with pytest.raises(AssertionError, match="topk_ids"):
        fused_moe(x, w13, w2, topk_ids[:1], topk_weights[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 1024])
def test_deepseek_v2_lite_shapes_gpu(num_tokens):
    """64 experts × (2048 hidden, 1408 wide), top-6, bf16, the launcher's own tiles."""
    x, w13, w2, topk_ids, topk_weights = make_inputs(num_tokens, 6, 64, 2048, 1408, dtype=torch.bfloat16,
                                                     seed=num_tokens)
    out = fused_moe(x, w13, w2, topk_ids, topk_weights)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, topk_ids, topk_weights), **TOLERANCE[torch.bfloat16])
