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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from latentmoe.cluster.communicator import Communicator
from latentmoe.cluster.dispatch import AttentionDispatcher, expert_exchange
from latentmoe.engine.engine import LLMEngine, RequestOutput
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.cluster.membership import Group
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
    """A request handed to an attention shard: already tokenized and validated by the ingress."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # a request moved here from a shard that failed (or drained): the tokens (and characters of text) its client has
    # already received; they are recomputed into this shard's cache and the stream goes on after them
    output_token_ids: list[int] = field(default_factory=list)
    num_output_chars: int = 0


class AttentionShard:
    """A ``Stepper`` (``latentmoe.cluster.step_loop``): adds and aborts arrive from any thread into an inbox,
    the step loop's thread applies them at the start of a step and hands each step's outputs to ``publish``.

    If the step fails (a peer died in a collective), the engine is left as it was scheduled: running the
    next step recomputes the same tokens (blocks are grown idempotently, nothing was sampled or emitted).
    """

    STATS_INTERVAL_S = 1.0

    def __init__(self, config: EngineConfig, placement: ExpertPlacement,
                 publish: Callable[[list[RequestOutput], dict[str, str]], None] | None = None,
                 report_load: Callable[[dict], None] | None = None):
        self.placement = placement
        self.publish = publish or (lambda outputs, errors: None)
        self.report_load = report_load or (lambda stats: None)
        self._stats_sent = 0.0
        self.dispatcher: AttentionDispatcher | None = None
        self.engine = LLMEngine(config, expert_ids=[], routed_fn=self._routed)
        self.model_config = self.engine.model_config
        self.hidden_dtype = resolve_dtype(config.dtype)
        self._inbox: list[tuple[str, object]] = []  # ("add", NewRequest) | ("abort", request id)
        self._inbox_lock = threading.Lock()
        self._num_queued = 0
        self.cache = self.engine.cache_stats()  # after the last step (read from other threads)
        self.num_requests = 0  # admitted and not finished (read from other threads)
        self.timings = {"step_s": 0.0, "a2a_s": 0.0, "num_steps": 0}

    # ---- any thread -------------------------------------------------------------------------------------------

    def add(self, req: NewRequest) -> None:
        with self._inbox_lock:
            self._inbox.append(("add", req))
            self._num_queued += 1

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))

    # ---- the step loop's thread -------------------------------------------------------------------------------

    def connect(self, comm: Communicator, group: Group) -> None:
        """Join a (new) collective group; the ranks may have moved. Statistics carry over."""
        c = self.model_config
        previous = self.dispatcher
        self.dispatcher = AttentionDispatcher(comm, self.placement, group.expert_ranks, c.num_experts_per_tok,
                                              c.n_routed_experts)
        if previous is not None:
            self.dispatcher.stats, self.dispatcher.a2a_seconds = previous.stats, previous.a2a_seconds

    def num_work(self) -> int:
        return len(self.engine.requests) + self._num_queued

    def _routed(self, layer, h, topk_ids, topk_weights):
        assert self.dispatcher is not None, "attention shard stepped before its collective group was formed"
        return self.dispatcher.routed(layer, h, topk_ids, topk_weights)

    def _apply_inbox(self) -> tuple[list[RequestOutput], dict[str, str]]:
        with self._inbox_lock:
            inbox, self._inbox, self._num_queued = self._inbox, [], 0
        outputs, errors = [], {}
        for kind, item in inbox:
            if kind == "abort":
                out = self.engine.abort_request(item)
                if out is not None:
                    outputs.append(out)
                continue
            try:
                self.engine.add_request(item.prompt_token_ids, item.params, request_id=item.request_id,
                                        output_token_ids=item.output_token_ids,
                                        num_output_chars=item.num_output_chars)
            except (ValueError, TypeError) as e:
                errors[item.request_id] = str(e)
        return outputs, errors

    def step(self) -> None:
        start = time.perf_counter()
        a2a_before = self.dispatcher.a2a_seconds
        outputs, errors = self._apply_inbox()
        if outputs or errors:  # aborts and refusals are final whatever the step does
            self.publish(outputs, errors)
        passes = self.engine.num_forward_passes
        outputs = self.engine.step()
        if self.engine.num_forward_passes == passes:
            self.idle_pass()
        self.cache = self.engine.cache_stats()
        self.num_requests = len(self.engine.requests)
        self.timings["step_s"] += time.perf_counter() - start
        self.timings["a2a_s"] += self.dispatcher.a2a_seconds - a2a_before
        self.timings["num_steps"] += 1
        if outputs:
            self.publish(outputs, {})
        if time.monotonic() - self._stats_sent >= self.STATS_INTERVAL_S or not self.engine.has_unfinished:
            self._stats_sent = time.monotonic()
            self.report_load(self.stats())

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

    def cache_stats_and_limits(self) -> dict:
        return self.cache | {"max_model_len": self.engine.max_model_len, "num_requests": self.num_requests}


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
        self.timings = {"step_s": 0.0, "compute_s": 0.0, "num_steps": 0}

    def connect(self, comm: Communicator, group: Group) -> None:
        self.comm = comm

    def num_work(self) -> int:
        return 0

    @torch.no_grad()
    def step(self) -> None:
        """Serve one step: every MoE layer's exchange, in order."""
        assert self.comm is not None, "expert shard stepped before its collective group was formed"
        start = time.perf_counter()
        rows, compute = 0, 0.0
        for experts in self.moe_layers:
            n, seconds = expert_exchange(self.comm, experts, self.config.hidden_size,
                                         self.config.num_experts_per_tok, self.dtype, self.device)
            rows, compute = rows + n, compute + seconds
        self.num_rows += rows
        self.timings["step_s"] += time.perf_counter() - start
        self.timings["compute_s"] += compute
        self.timings["num_steps"] += 1
