"""Runs one scheduled step of the model over the paged latent cache.

A step is a flat list of tokens from several sequences (no padding): chunks of
prefill and single decode tokens. Every token's latents are written to the cache
first; decode tokens then attend in latent space through the block tables
(``mla_decode``), prefill chunks attend over their sequence's cached latents
(naive or absorbed MLA). Only the rows that sample go through the final norm and
``lm_head``.

Legend: T tokens in the step, Bd decode rows, H heads, R kv_lora_rank, P rope dims.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from latentmoe.engine.latent_cache import LatentCache
from latentmoe.kernels import set_kernels
from latentmoe.model.deepseek_v2 import MLA, DeepseekV2ForCausalLM, RoutedFn


@dataclass
class StepInputs:
    """Tensors of one step, built from the scheduler's chunks."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slots
    decode_rows: torch.Tensor  # [Bd] row of each decode token in the step
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [Bd] int32 (tokens in cache incl. the new one)
    prefill: list[tuple[int, int, int, list[int]]]  # (first row, num tokens, start position, block table)
    prefill_masks: list[torch.Tensor]  # per prefill chunk [n, start + n] bool: query i sees keys 0..start+i
    sample_rows: torch.Tensor  # [N] rows whose logits are sampled
    logit_rows: torch.Tensor  # [L] rows that go through lm_head: a chunk's every row if all_logits, else sample_rows


def build_inputs(chunks, block_size: int, device: torch.device) -> StepInputs:
    token_ids, positions, slots, sample_rows, logit_rows = [], [], [], [], []
    decode_rows, decode_tables, decode_lens, prefill = [], [], [], []
    for chunk in chunks:
        seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
        row = len(token_ids)
        token_ids += seq.all_token_ids[start : start + n]
        positions += range(start, start + n)
        table = seq.block_table
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        if n == 1 and start > 0:
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(start + 1)
        else:
            prefill.append((row, n, start, table))
        if chunk.sample:
            sample_rows.append(row + n - 1)
        if getattr(chunk, "all_logits", False):
            logit_rows += range(row, row + n)
        elif chunk.sample:
            logit_rows.append(row + n - 1)
    masks = {}  # (n, start) -> mask, shared by chunks of one shape and by every layer
    for _, n, start, _ in prefill:
        if (n, start) not in masks:
            masks[n, start] = torch.ones(n, start + n, dtype=torch.bool, device=device).tril(diagonal=start)
    width = max((len(t) for t in decode_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in decode_tables]

    def tensor(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return StepInputs(
        token_ids=tensor(token_ids), positions=tensor(positions), slots=tensor(slots),
        decode_rows=tensor(decode_rows), decode_block_tables=tensor(padded, torch.int32).view(len(padded), width),
        decode_seq_lens=tensor(decode_lens, torch.int32), prefill=prefill,
        prefill_masks=[masks[n, start] for _, n, start, _ in prefill], sample_rows=tensor(sample_rows),
        logit_rows=tensor(logit_rows),
    )


class ModelRunner:
    """Holds the model (or its attention side) and the latent cache of one engine or attention shard."""

    def __init__(self, model: DeepseekV2ForCausalLM, cache: LatentCache, *, prefill_absorbed: bool = False,
                 kernels: str = "torch"):
        self.model, self.cache = model, cache
        self.config = model.config
        self.prefill_absorbed = prefill_absorbed
        self.device = cache.kv.device
        set_kernels(model, kernels)  # a family: kernels.kernel_family's answer

    @torch.no_grad()
    def execute(self, chunks, routed_fn: RoutedFn | None = None) -> torch.Tensor:
        """Run the chunks; returns float32 logits ``[L, vocab]``, chunk by chunk in order: a row per token of a
        chunk with ``all_logits`` (prompt logprobs), else one row for a chunk that samples (its last token)."""
        inputs = build_inputs(chunks, self.cache.block_size, self.device)
        model = self.model
        cos, sin = model.rotary(inputs.positions)  # [T, P/2]
        x = model.model.embed_tokens(inputs.token_ids)  # [T, D]
        attend_fn = functools.partial(self._attend, inputs)
        for layer in model.model.layers:
            x = layer(x, cos, sin, attend_fn, routed_fn)
        h = model.model.norm(x[inputs.logit_rows])
        return model.lm_head(h).float()

    def _attend(self, inputs: StepInputs, attn: MLA, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        """One layer's attention for the step's tokens (``q_* [T, H, *]``, latents ``[T, *]``) -> ``[T, D]``.

        The tokens' latents go into the cache first; decode rows attend through their block tables, prefill
        chunks over their sequence's cached latents.
        """
        self.cache.write(attn.layer_idx, inputs.slots, c_kv, k_pe)
        out = q_nope.new_empty(q_nope.shape[0], attn.o_proj.out_features)  # [T, D]
        if len(inputs.decode_rows):
            rows = inputs.decode_rows
            o_latent = attn.decode_impl(
                attn.absorb_query(q_nope[rows]), q_pe[rows], self.cache.kv[attn.layer_idx],
                inputs.decode_block_tables, inputs.decode_seq_lens, attn.softmax_scale)  # [Bd, H, R]
            out[rows] = attn.output_from_latent(o_latent)
        attend = attn.attend_absorbed if self.prefill_absorbed else attn.attend_naive
        fresh = c_kv.dtype == self.cache.dtype  # the cache holds these tokens' latents exactly as computed
        for (row, n, start, table), mask in zip(inputs.prefill, inputs.prefill_masks):
            if start == 0 and fresh:  # a chunk from the sequence's start: its keys are its own tokens
                keys_c_kv, keys_k_pe = c_kv[row : row + n], k_pe[row : row + n]
            else:
                keys_c_kv, keys_k_pe = self.cache.gather(attn.layer_idx, table, start + n)
            out[row : row + n] = attend(q_nope[row : row + n], q_pe[row : row + n], keys_c_kv, keys_k_pe, mask)
        return out
