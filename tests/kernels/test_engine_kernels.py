"""The engine with the Triton kernels forced on (the interpreter on a CPU, compiled on a GPU) against the torch
references."""

from __future__ import annotations

import random

import pytest
import torch

from latentmoe import LLM, SamplingParams
from latentmoe.kernels import kernel_family, numba_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiles only for a GPU; on a CPU it is interpreted


@pytest.mark.parametrize("setup", [dict(block_size=16), dict(block_size=4, max_num_batched_tokens=24)])
def test_kernels_give_the_reference_tokens(tiny_dir, setup):
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 1024) for _ in range(n)] for n in (1, 37, 5, 70)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = LLM(model=str(tiny_dir), kernels="torch", device=DEVICE, **setup)
    kernels = LLM(model=str(tiny_dir), kernels="triton", device=DEVICE, **setup)
    layers = kernels.engine.model.model.layers  # really the Triton launchers
    assert {layer.self_attn.decode_impl.__name__ for layer in layers} == {"mla_decode"}
    assert {layer.mlp.experts.moe_impl.__name__ for layer in layers if layer.is_moe} == {"fused_moe"}
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    assert [o.token_ids for o in kernels.generate(prompts, params)] == expected


@pytest.mark.skipif(not numba_available(), reason="the CPU kernels need numba (a GPU machine's own Python may lack it)")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_give_the_reference_tokens(tiny_dir, threads):
    """The engine's CPU default (the Numba MLA decode, and on one thread, a shard's, the Numba routed experts)
    against the torch references, prefill chunked so that decode runs over several blocks and a batch of sequences
    of different lengths."""
    rng = random.Random(6)
    prompts = [[rng.randrange(2, 1024) for _ in range(n)] for n in (1, 37, 5, 70, 130)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    reference = LLM(model=str(tiny_dir), kernels="torch", block_size=16)
    cpu = LLM(model=str(tiny_dir), block_size=16)  # kernels="auto"
    assert {layer.self_attn.decode_impl.__name__ for layer in cpu.engine.model.model.layers} == {"mla_decode_cpu"}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref_outs, cpu_outs = reference.generate(prompts, params), cpu.generate(prompts, params)
    finally:
        torch.set_num_threads(previous)
    assert [o.token_ids for o in cpu_outs] == [o.token_ids for o in ref_outs]
    for ours, theirs in zip(cpu_outs, ref_outs):  # every step's top logprobs, to float32 rounding
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_kernel_setting():
    assert kernel_family("auto", "cuda") == "triton" and kernel_family("torch", "cuda") == "torch"
    assert kernel_family("auto", "cpu") == ("numba" if numba_available() else "torch")
    with pytest.raises(ValueError, match="kernels must be"):
        kernel_family("cuda", "cpu")
