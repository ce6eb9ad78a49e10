"""The engine with the Triton kernels forced on (the interpreter on a CPU, compiled on a GPU) against the torch
references."""

from __future__ import annotations

import random

import pytest
import torch

from latentmoe import LLM, SamplingParams
from latentmoe.kernels import use_triton

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


def test_kernel_setting():
    assert use_triton("auto", "cpu") is False and use_triton("torch", "cuda") is False
    assert use_triton("auto", "cuda") is True
    with pytest.raises(ValueError, match="kernels must be"):
        use_triton("cuda", "cpu")
