"""Turns a step's logits into tokens, each row with its own request's parameters.

Per row, in vLLM's order: the raw log-softmax (reported as logprobs), then ``min_tokens``
(EOS and stop ids masked), ``logit_bias``, the repetition penalty (prompt and output tokens,
as transformers' ``RepetitionPenaltyLogitsProcessor``), presence and frequency penalties
(output tokens, OpenAI's formula); then greedy argmax, or temperature, ``min_p``, top-k /
top-p and a draw. Rows with neutral parameters take the batched argmax and nothing else.

A seeded request draws its n-th token from a generator seeded by ``(seed, n)``, so the same
seed gives the same tokens whatever else is in the batch, and after a preemption (recompute)
too. Unseeded requests draw from the engine's own generator.

Legend: N rows that sample, V vocabulary.
"""

from __future__ import annotations

import torch

from latentmoe.engine.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1

# a position's logprobs: token id -> log-softmax of the raw logits, the top-N in rank order, then the chosen
# token when it is not among them (the shape of vLLM's ``dict[int, Logprob]``)
Logprobs = dict[int, float]


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


def apply_penalties(logits: torch.Tensor, p: SamplingParams, num_output_tokens: int, prompt_token_ids: list[int],
                    output_token_ids: list[int], eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """One row's logits ``[V]`` after min_tokens, logit_bias and the three penalties (a new tensor)."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if num_output_tokens < p.min_tokens:
        masked = [t for t in list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids)) if t < vocab]
        if masked:
            logits[masked] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_token_ids) | set(output_token_ids)), dtype=torch.long)
        score = logits[seen]
        logits[seen] = torch.where(score > 0, score / p.repetition_penalty, score * p.repetition_penalty)
    if output_token_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_token_ids, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def top_logprobs(logprobs: torch.Tensor, num_top: int, chosen: torch.Tensor | list[int]) -> list[Logprobs]:
    """Rows of log-softmax ``[R, V]`` -> per row the top ``num_top`` and the chosen token."""
    chosen = torch.as_tensor(chosen, dtype=torch.long)
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    if num_top:
        values, ids = logprobs.topk(num_top, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    else:
        values = ids = [[] for _ in range(logprobs.shape[0])]
    out = []
    for row_ids, row_values, token, lp in zip(ids, values, chosen.tolist(), chosen_lp):
        d = dict(zip(row_ids, row_values))
        d.setdefault(token, lp)
        out.append(d)
    return out


class Sampler:
    def __init__(self, seed: int = 0, eos_token_ids: tuple[int, ...] = ()):
        self.generator = torch.Generator().manual_seed(seed)
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], num_output_tokens: list[int],
                 histories: list[tuple[list[int], list[int]]] | None = None) -> list[int]:
        return self.sample(logits, params, num_output_tokens, histories)[0]

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], num_output_tokens: list[int],
               histories: list[tuple[list[int], list[int]]] | None = None
               ) -> tuple[list[int], list[Logprobs | None]]:
        """``logits [N, V]`` (float32), one ``SamplingParams`` per row, how many tokens each row already has,
        and (for penalties) each row's ``(prompt ids, output ids)``. Returns the tokens and, for rows whose
        params ask for ``logprobs``, the raw logprobs of the chosen token and the top-N."""
        assert len(params) == len(num_output_tokens) == logits.shape[0], (len(params), logits.shape)
        tokens = logits.argmax(dim=-1).tolist()  # [N]
        logits = logits.float().cpu()
        for row, (p, n) in enumerate(zip(params, num_output_tokens)):
            if p.greedy and not p.modifies_logits:
                continue
            row_logits = logits[row]
            if p.modifies_logits:
                prompt_ids, output_ids = histories[row] if histories is not None else ([], [])
                row_logits = apply_penalties(row_logits, p, n, prompt_ids, output_ids, self.eos_token_ids)
            if p.greedy:
                tokens[row] = int(row_logits.argmax())
                continue
            scaled = row_logits / p.temperature
            if p.min_p > 0.0:
                probs = scaled.softmax(-1)
                scaled = scaled.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
            probs = filter_logits(scaled, p.top_k, p.top_p).softmax(-1)
            gen = self.generator if p.seed is None else torch.Generator().manual_seed(_row_seed(p.seed, n))
            # exponential race: argmax p_i / E_i with E_i ~ Exp(1) samples i with probability p_i
            noise = torch.empty_like(probs).exponential_(generator=gen)
            tokens[row] = int((probs / noise).argmax())
        logprobs: list[Logprobs | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if rows:
            lp = logits[rows].log_softmax(-1)  # [R, V]
            for group in {params[i].logprobs for i in rows}:  # rows asking for the same N share one topk
                members = [j for j, i in enumerate(rows) if params[i].logprobs == group]
                for j, d in zip(members, top_logprobs(lp[members], group, [tokens[rows[j]] for j in members])):
                    logprobs[rows[j]] = d
        return tokens, logprobs
