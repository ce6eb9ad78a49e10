"""Turns a step's logits into tokens: greedy, or temperature / top-k / top-p sampling.

A seeded request draws its n-th token from a generator seeded by ``(seed, n)``, so the same
seed gives the same tokens whatever else is in the batch, and after a preemption (recompute)
too. Unseeded requests draw from the engine's own generator.

Legend: N rows that sample, V vocabulary.
"""

from __future__ import annotations

import torch

from latentmoe.cluster.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


def _row_seed(seed: int, index: int) -> int:
    # splitmix64-style mixing: nearby (seed, index) pairs give unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits ``[V]`` with everything outside the top-k / top-p set at -inf (at least one survives)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], num_output_tokens: list[int]) -> list[int]:
        """``logits [N, V]`` (float32), one ``SamplingParams`` per row, and how many tokens each row already has."""
        assert len(params) == len(num_output_tokens) == logits.shape[0], (len(params), logits.shape)
        tokens = logits.argmax(dim=-1).tolist()  # [N]
        logits = logits.float().cpu()
        for row, (p, n) in enumerate(zip(params, num_output_tokens)):
            if p.greedy:
                continue
            scaled = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = scaled.softmax(-1)
            gen = self.generator if p.seed is None else torch.Generator().manual_seed(_row_seed(p.seed, n))
            # exponential race: argmax p_i / E_i with E_i ~ Exp(1) samples i with probability p_i
            noise = torch.empty_like(probs).exponential_(generator=gen)
            tokens[row] = int((probs / noise).argmax())
        return tokens
