"""The CPU kernels (Numba) against an independent computation: MLA decode against attention sequence by sequence,
the routed experts against each token on its own; and against the torch references."""

from __future__ import annotations

import pytest
import torch

from latentmoe.kernels import kernel_family, numba_available

if not numba_available():  # a dependency; a GPU machine's own Python may lack it
    pytest.skip("the CPU kernels need numba", allow_module_level=True)

from latentmoe.kernels.cpu import mla_decode_cpu  # noqa: E402
from latentmoe.kernels.reference import mla_decode_ref  # noqa: E402
from tests.kernels.test_mla_decode import CASES, make_inputs  # noqa: E402


def one_by_one(q_nope, q_pe, kv_cache, block_tables, seq_lens, scale):
    """Each sequence's latents picked out row by row, softmax over them: no paging, no padding."""
    R, S = q_nope.shape[-1], kv_cache.shape[1]
    out = []
    for b, n in enumerate(seq_lens.tolist()):
        latents = torch.stack([kv_cache[int(block_tables[b, t // S]), t % S] for t in range(n)]).double()
        probs = torch.softmax((q_nope[b].double() @ latents[:, :R].T + q_pe[b].double() @ latents[:, R:].T) * scale,
                              dim=-1)
        out.append(probs @ latents[:, :R])
    return torch.stack(out).float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_attention_sequence_by_sequence(case, threads, monkeypatch):
    seq_lens, H, R, P, S, _, scale = CASES[case]
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs(seq_lens * 3, heads=H, rank=R, rope=P, block_size=S,
                                                             dtype=torch.float32, seed=len(case), device="cpu")
    for b, n in enumerate(lens.tolist()):  # unused slots of each last block: never read
        kv_cache[block_tables[b, (n - 1) // S], (n - 1) % S + 1:] = float("nan")
    scale = scale or (R + P) ** -0.5
    monkeypatch.setattr("latentmoe.kernels.cpu.MIN_SEQS_PER_THREAD", 1)  # several threads even for small batches
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = mla_decode_cpu(q_nope, q_pe, kv_cache, block_tables, lens, scale)
    finally:
        torch.set_num_threads(previous)
    assert out.dtype == torch.float32 and out.shape == (len(lens), H, R)
    torch.testing.assert_close(out, one_by_one(q_nope, q_pe, kv_cache, block_tables, lens, scale),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, lens, scale),
                               atol=1e-5, rtol=1e-5)


def test_int64_tables_strided_queries_and_long_sequences():
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs([700, 1, 64, 129], heads=4, rank=64, rope=16,
                                                             block_size=64, dtype=torch.float32, seed=3, device="cpu")
    q = torch.cat([q_nope, q_pe], dim=-1)
    q_nope, q_pe = q[..., :64], q[..., 64:]  # views of one tensor, as the model passes them
    out = mla_decode_cpu(q_nope, q_pe, kv_cache, block_tables.long(), lens.long(), 0.1)
    torch.testing.assert_close(out, one_by_one(q_nope, q_pe, kv_cache, block_tables, lens, 0.1), atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_empty_batches_take_the_reference():
    q_nope, q_pe, kv_cache, block_tables, lens = make_inputs([5, 9], heads=2, rank=32, rope=8, block_size=4,
                                                             dtype=torch.bfloat16, seed=4, device="cpu")
    out = mla_decode_cpu(q_nope, q_pe, kv_cache, block_tables, lens, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, lens, 0.2))
    empty = mla_decode_cpu(q_nope[:0].float(), q_pe[:0].float(), kv_cache.float(), block_tables[:0], lens[:0], 0.2)
    assert empty.shape == (0, 2, 32)


def test_numba_setting():
    assert kernel_family("auto", "cpu") == "numba" and kernel_family("numba", "cpu") == "numba"
    with pytest.raises(ValueError, match="CPU only"):
        kernel_family("numba", "cuda")


def per_token(x, w13, w2, topk_ids, topk_weights):
    """Each (token, slot) on its own, in float64: weight * down(silu(gate(x)) * up(x)), summed per token."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, w in zip(topk_ids[t].tolist(), topk_weights[t].tolist()):
            if e < 0:
                continue
            h = w13[e].double() @ x[t].double()
            out[t] += w * (w2[e].double() @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out.float()


def by_columns(w: torch.Tensor) -> torch.Tensor:
    """``w [E, A, B]``, the same values, each expert's matrix stored by columns (``set_kernels``' CPU layout)."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,routing,sizes,dims", [
    (1, "random", "small", (64, 48)), (5, "random", "small", (64, 48)), (6, "skip_expert_1", "small", (64, 48)),
    (40, "random", "large", (64, 48)), (9, "one_expert", "large", (64, 48)), (12, "mixed", "both", (64, 48)),
    (3, "all_skipped", "none", (64, 48)),
    (3, "one_expert", "small", (64, 48)),  # 12 rows on one expert: SMALL_EXPERT_ROWS, two chunks of CHUNK_ROWS
    (3, "mixed", "small", (64, 48)),  # 9 rows on expert 0: uneven chunks (5 and 4)
    (4, "one_expert", "large", (64, 48)),  # 16 rows on one expert: torch's matmul
    (7, "random", "small", (30, 21)), (11, "mixed", "both", (30, 21)),  # widths not multiples of a vector
])
def test_experts_match_each_token_on_its_own(T, routing, sizes, dims, threads):
    """Few rows per expert (the Numba kernel), many (torch's matmuls), and both in one call, on one thread (and on
    two, where the reference runs), the weights by columns as the engines lay them out."""
    from latentmoe.kernels import experts_by_columns
    from latentmoe.kernels.cpu import SMALL_EXPERT_ROWS, fused_moe_cpu
    from latentmoe.kernels.reference import fused_moe_ref
    from tests.kernels.test_fused_moe import make_inputs as moe_inputs

    x, w13, w2, topk_ids, topk_weights = moe_inputs(T, 4, 6, *dims, dtype=torch.float32, seed=T, device="cpu",
                                                    routing="random" if routing == "mixed" else routing)
    if routing == "mixed":  # three slots of every token on expert 0, the fourth anywhere else
        topk_ids[:, :3] = 0
        topk_ids[:, 3] = torch.arange(T) % 5 + 1
    counts = torch.bincount(topk_ids[topk_ids >= 0].flatten(), minlength=6)
    small, large = bool(((counts > 0) & (counts <= SMALL_EXPERT_ROWS)).any()), bool((counts > SMALL_EXPERT_ROWS).any())
    assert (small, large) == {"small": (True, False), "large": (False, True), "both": (True, True),
                              "none": (False, False)}[sizes]
    w13c, w2c = by_columns(w13), by_columns(w2)
    assert experts_by_columns(w13c, w2c) and not experts_by_columns(w13, w2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = fused_moe_cpu(x, w13c, w2c, topk_ids, topk_weights)
    finally:
        torch.set_num_threads(previous)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, per_token(x, w13, w2, topk_ids, topk_weights), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, topk_ids, topk_weights), atol=1e-5, rtol=1e-5)


def test_experts_by_rows_take_the_reference():
    """Weights stored by rows (not laid out by ``set_kernels``) still give the right answer: the reference's."""
    from latentmoe.kernels.cpu import fused_moe_cpu
    from latentmoe.kernels.reference import fused_moe_ref
    from tests.kernels.test_fused_moe import make_inputs as moe_inputs

    x, w13, w2, topk_ids, topk_weights = moe_inputs(5, 4, 6, 64, 48, dtype=torch.float32, seed=2, device="cpu")
    assert w13.is_contiguous() and w2.is_contiguous()
    torch.testing.assert_close(fused_moe_cpu(x, w13, w2, topk_ids, topk_weights),
                               fused_moe_ref(x, w13, w2, topk_ids, topk_weights))


def test_experts_in_bf16_take_the_reference():
    from latentmoe.kernels.cpu import fused_moe_cpu
    from latentmoe.kernels.reference import fused_moe_ref
    from tests.kernels.test_fused_moe import make_inputs as moe_inputs

    x, w13, w2, topk_ids, topk_weights = moe_inputs(5, 2, 4, 32, 16, dtype=torch.bfloat16, seed=1, device="cpu")
    torch.testing.assert_close(fused_moe_cpu(x, w13, w2, topk_ids, topk_weights),
                               fused_moe_ref(x, w13, w2, topk_ids, topk_weights))


def test_packed_linear_matches_a_float64_product():
    """oneDNN's product on the prepacked weight against the same product in float64, for the shapes a step
    passes (no rows, one, a decode batch, a prefill, a 3-D batch, rows read with a stride)."""
    from latentmoe.kernels.cpu import PACKED_LINEAR_MIN_ELEMENTS, packed_linear

    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(300, 256, generator=gen) / 16
    assert weight.numel() >= PACKED_LINEAR_MIN_ELEMENTS
    linear = packed_linear(weight)
    assert linear is not None
    wide = torch.randn(9, 512, generator=gen)
    for x in (torch.randn(0, 256), torch.randn(1, 256, generator=gen), torch.randn(16, 256, generator=gen),
              torch.randn(200, 256, generator=gen), torch.randn(3, 5, 256, generator=gen), wide[:, ::2]):
        out = linear(x)
        assert out.shape == (*x.shape[:-1], 300) and out.dtype == torch.float32
        torch.testing.assert_close(out, (x.double() @ weight.double().T).float(), atol=1e-5, rtol=1e-5)
    # small weights keep F.linear (oneDNN's call costs more than it saves), and so do other dtypes and meta tensors
    assert packed_linear(torch.randn(16, 256)) is None
    assert packed_linear(weight.bfloat16()) is None
    assert packed_linear(torch.empty(300, 256, device="meta")) is None


def test_model_with_packed_linears_matches_transformers(tmp_path):
    """The whole model with the CPU kernels set, at widths where most projections take the packed product,
    against Hugging Face's DeepseekV2ForCausalLM on the same checkpoint."""
    from latentmoe.kernels import experts_by_columns, set_kernels
    from latentmoe.model import load_model
    from latentmoe.model.deepseek_v2 import Linear
    from tests.model.test_model import hf_logits, rel_err, small_config, write_checkpoint

    cfg = small_config(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                       kv_lora_rank=256, num_attention_heads=2)
    path = write_checkpoint(tmp_path / "ckpt", cfg, seed=3)
    model = load_model(path)
    experts = [layer.mlp.experts for layer in model.model.layers if layer.is_moe]
    set_kernels(model, "numba")
    assert experts and all(experts_by_columns(e.w13, e.w2) for e in experts)  # the CPU kernel's layout
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    packed = {name for name, m in linears.items() if m.impl is not None}
    assert {"lm_head", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa",
            "model.layers.1.mlp.shared_experts.down_proj"} <= packed
    assert "model.layers.0.self_attn.o_proj" not in packed  # 256 x 20: below the size where packing pays
    input_ids = torch.randint(2, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    assert rel_err(model(input_ids), hf_logits(path, input_ids)) < 1e-4
    set_kernels(model, "torch")  # the references again: F.linear everywhere, the experts by rows
    assert all(m.impl is None for m in linears.values())
    assert all(e.w13.is_contiguous() and e.w2.is_contiguous() for e in experts)
    assert rel_err(model(input_ids), hf_logits(path, input_ids)) < 1e-4
