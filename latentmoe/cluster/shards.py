"""The two kinds of shard, as plain classes (the Ray actors in ``latentmoe.actors`` hold one each).

An attention shard is a whole engine for its own requests (scheduler, latent cache, sampler,
detokenizers) over the attention side of the model: embedding, MLA, gates, shared experts,
dense layers, lm_head. Its routed experts are reached through the dispatcher, by all-to-all.
An expert shard holds a slice of the routed experts of every MoE layer and no per-request
state. Every ``step`` call on every shard is one lockstep step of the collective group: each
shard goes through the MoE layers' exchanges in the same order, with empty splits when it has
nothing to send.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from latentmoe.cluster.communicator import Communicator
from latentmoe.cluster.dispatch import AttentionDispatcher, expert_exchange
from latentmoe.engine.engine import LLMEngine, RequestOutput
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.kernels import set_kernels, use_triton
from latentmoe.model.loader import load_model, resolve_dtype


def shard_threads(assigned_cpus: float | None, cores: int | None = None) -> int:
    """Torch intra-op threads for a shard process: the CPUs its bundle holds (whole ones, at least one), no more
    than the cores this process may run on. Without it every shard on a node takes all the cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(assigned_cpus or 1), cores))


@dataclass
class NewRequest:
    """A request handed to an attention shard: already tokenized and validated by the router."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # a request moved here from a shard that failed: the tokens (and characters of text) its client has
    # already received; they are recomputed into this shard's cache and the stream goes on after them
    output_token_ids: list[int] = field(default_factory=list)
    num_output_chars: int = 0


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why the shard refused it
    cache: dict = field(default_factory=dict)  # the shard's cache_stats() after the step
    seconds: float = 0.0  # wall time of the step on the shard
    a2a_seconds: float = 0.0  # of which in the collectives
    compute_seconds: float = 0.0  # expert shards: time in the experts themselves
    num_tokens: int = 0  # tokens this shard ran (attention) or received (experts)
    dispatch: dict | None = None  # attention shards, about once a second: cumulative DispatchStats.as_dict()


class AttentionShard:
    STATS_INTERVAL_S = 1.0

    def __init__(self, config: EngineConfig, placement: ExpertPlacement, expert_ranks: list[int]):
        self.placement, self.expert_ranks = placement, expert_ranks
        self._stats_sent = 0.0
        self.dispatcher: AttentionDispatcher | None = None
        self.engine = LLMEngine(config, expert_ids=[], routed_fn=self._routed)
        self.model_config = self.engine.model_config
        self.hidden_dtype = resolve_dtype(config.dtype)

    def connect(self, comm: Communicator, expert_ranks: list[int] | None = None) -> None:
        """Join a (new) collective group; after a fault the ranks may have moved. Statistics carry over."""
        if expert_ranks is not None:
            self.expert_ranks = expert_ranks
        c = self.model_config
        previous = self.dispatcher
        self.dispatcher = AttentionDispatcher(comm, self.placement, self.expert_ranks, c.num_experts_per_tok,
                                              c.n_routed_experts)
        if previous is not None:
            self.dispatcher.stats, self.dispatcher.a2a_seconds = previous.stats, previous.a2a_seconds

    def _routed(self, layer, h, topk_ids, topk_weights):
        assert self.dispatcher is not None, "attention shard stepped before its collective group was formed"
        return self.dispatcher.routed(layer, h, topk_ids, topk_weights)

    def step(self, new: list[NewRequest], aborts: list[str]) -> StepResult:
        """Apply the router's adds and aborts, then run one step (or an idle pass through the exchanges).

        If the step fails (a peer died in a collective), the engine is left as it was scheduled: running the
        next step recomputes the same tokens (blocks are grown idempotently, nothing was sampled or emitted).
        """
        start = time.perf_counter()
        a2a_before = self.dispatcher.a2a_seconds
        result = StepResult()
        for request_id in aborts:
            out = self.engine.abort_request(request_id)
            if out is not None:
                result.outputs.append(out)
        for req in new:
            try:
                self.engine.add_request(req.prompt_token_ids, req.params, request_id=req.request_id,
                                        output_token_ids=req.output_token_ids,
                                        num_output_chars=req.num_output_chars)
            except (ValueError, TypeError) as e:
                result.errors[req.request_id] = str(e)
        passes = self.engine.num_forward_passes
        result.outputs += self.engine.step()
        if self.engine.num_forward_passes == passes:
            self.idle_pass()
        result.cache = self.engine.cache_stats()
        if time.monotonic() - self._stats_sent >= self.STATS_INTERVAL_S or not self.engine.has_unfinished:
            result.dispatch = self.stats()
            self._stats_sent = time.monotonic()
        result.seconds = time.perf_counter() - start
        result.a2a_seconds = self.dispatcher.a2a_seconds - a2a_before
        return result

    def idle_pass(self) -> None:
        """Join every MoE layer's exchange with no tokens, so the expert shards and the other attention
        shards are not left waiting."""
        c = self.model_config
        empty = torch.empty(0, c.hidden_size, dtype=self.hidden_dtype, device=self.engine.device)
        ids = torch.empty(0, c.num_experts_per_tok, dtype=torch.long, device=self.engine.device)
        weights = torch.empty(0, c.num_experts_per_tok, dtype=torch.float32, device=self.engine.device)
        for layer in c.moe_layers:
            self._routed(layer, empty, ids, weights)

    def stats(self) -> dict:
        return self.dispatcher.stats.as_dict() if self.dispatcher else {}

    def request_ids(self) -> list[str]:
        return list(self.engine.requests)

    def abort_all(self) -> list[str]:
        """Drop every request (the router gave up on them); returns their ids. Frees all blocks."""
        ids = list(self.engine.requests)
        for request_id in ids:
            self.engine.abort_request(request_id)
        return ids

    def cache_stats_and_limits(self) -> dict:
        return self.engine.cache_stats() | {"max_model_len": self.engine.max_model_len}


class ExpertShard:
    def __init__(self, config: EngineConfig, placement: ExpertPlacement, shard: int):
        self.shard = shard
        self.expert_ids = placement.experts_on(shard)
        self.dtype = resolve_dtype(config.dtype)
        self.device = torch.device(config.device)
        self.model = load_model(config.model, dtype=self.dtype, attention=False, expert_ids=self.expert_ids,
                                device=self.device)
        self.config = self.model.config
        self.moe_layers = [layer.mlp.experts for layer in self.model.model.layers if layer.is_moe]
        set_kernels(self.model, use_triton(config.kernels, self.device))
        self.comm: Communicator | None = None
        self.num_rows = 0

    def connect(self, comm: Communicator) -> None:
        self.comm = comm

    @torch.no_grad()
    def step(self) -> StepResult:
        """Serve one step: every MoE layer's exchange, in order."""
        assert self.comm is not None, "expert shard stepped before its collective group was formed"
        start = time.perf_counter()
        rows, compute = 0, 0.0
        for experts in self.moe_layers:
            n, seconds = expert_exchange(self.comm, experts, self.config.hidden_size,
                                         self.config.num_experts_per_tok, self.dtype, self.device)
            rows, compute = rows + n, compute + seconds
        self.num_rows += rows
        return StepResult(seconds=time.perf_counter() - start, compute_seconds=compute, num_tokens=rows)
