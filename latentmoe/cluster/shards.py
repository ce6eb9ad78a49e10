"""The two kinds of shard, as plain classes (the Ray actors in ``latentmoe.actors`` hold one each).

An attention shard is a whole engine for its own requests (scheduler, latent cache, sampler,
detokenizers) over the attention side of the model: embedding, MLA, gates, shared experts,
dense layers, lm_head. Its routed experts are reached through the dispatcher, by all-to-all.
An expert shard holds a slice of the routed experts of every MoE layer and no per-request
state. Every ``step`` call on every shard is one lockstep step of the collective group: each
shard goes through the MoE layers' exchanges in the same order, with empty splits when it has
nothing to send.

A step may run as two micro-batches (ping-pong): each on a lane of its own (a second communicator over
the same ranks) and a thread of its own, on every shard. While one micro-batch's tokens are at the experts,
the other runs attention; the expert shards serve the two lanes in two threads. Within a lane the
exchanges go layer by layer, as with one batch, so each lane's collectives match on every rank.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from latentmoe.cluster.communicator import Communicator
from latentmoe.cluster.dispatch import AttentionDispatcher, expert_exchange
from latentmoe.cluster.eplb import ReplicatedPlacement
from latentmoe.engine.engine import LLMEngine, RequestOutput
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.cluster.membership import Group
from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.kernels import kernel_family, set_kernels
from latentmoe.model.loader import load_model, resolve_dtype

logger = logging.getLogger(__name__)

# with micro_batches 0 (by batch size): two micro-batches once an attention shard has this many requests
AUTO_MICRO_BATCH_REQUESTS = 4

# an attention shard's forward pass of at least this many tokens runs on ``EngineConfig.prefill_threads``
PREFILL_MIN_TOKENS = 128


def max_lanes(config: EngineConfig) -> int:
    """Micro-batches a step may run as. ``micro_batches`` 0 (by batch size) means two on CUDA only: on CPU
    shards that share cores, two lanes measured slower than one (``benchmarks/bench_cluster.py``: 0.90x on
    2 cores, the lanes' threads contend for the same cores and the GIL)."""
    if config.micro_batches == 0:
        return 2 if torch.device(config.device).type == "cuda" else 1
    return config.micro_batches


def open_lanes(comm: Communicator, lanes: int) -> list[Communicator]:
    """The communicators a member's micro-batches run on: ``comm``, and a second lane when ``lanes`` is 2.
    Every member of a group calls it with the same setting (it is collective)."""
    if lanes == 1:
        return [comm]
    try:
        return [comm, comm.lane()]
    except NotImplementedError as e:
        logger.warning("latentmoe: one micro-batch per step: %s", e)
        return [comm]


def split_chunks(chunks: list, lanes: int) -> list[list]:
    """The step's chunks as ``lanes`` contiguous runs (so the logits keep the chunks' order), the two balanced
    by tokens; the second is empty when there is one chunk."""
    if lanes == 1:
        return [chunks]
    if len(chunks) < 2:
        return [chunks, []]
    total = sum(c.num_tokens for c in chunks)
    best, best_gap, run = 1, None, 0
    for i in range(1, len(chunks)):
        run += chunks[i - 1].num_tokens
        gap = abs(total - 2 * run)
        if best_gap is None or gap < best_gap:
            best, best_gap = i, gap
    return [chunks[:best], chunks[best:]]


class _Lanes:
    """Runs ``fn(lane)`` for lanes 1.. on threads of their own and lane 0 on the caller's; returns the results
    in lane order. A lane that fails raises after every lane has ended."""

    def __init__(self):
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, fn: Callable[[int], object], lanes: int) -> list:
        if lanes == 1:
            return [fn(0)]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="latentmoe-lane")
        other = self._pool.submit(fn, 1)
        try:
            first = fn(0)
        finally:
            second = other.result()  # a failed collective fails the other lane's too (within its timeout)
        return [first, second]


# A shard waits in collectives while its peers compute, on cores it may share with them (several shards on a
# node; on one machine, all of them): OpenMP's idle threads must sleep there, not spin, or they take the
# cores the peers they wait for need. libgomp spins for a while by default, which suits one process alone
# (the single-process engine keeps it). Read when a process starts, so the shard actors get it through
# their runtime_env. Measured by ``benchmarks/bench_cluster.py`` (see its ``--omp-wait-policy``).
SHARD_ENV_VARS = {"OMP_WAIT_POLICY": "PASSIVE"}


def shard_runtime_env() -> dict:
    """The ``runtime_env`` of a shard actor: ``SHARD_ENV_VARS``, unless this process's environment sets them
    (``OMP_WAIT_POLICY=ACTIVE latentmoe serve ...`` keeps OpenMP's spinning)."""
    return {"env_vars": {k: os.environ.get(k, v) for k, v in SHARD_ENV_VARS.items()}}


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def shard_threads(assigned_cpus: float | None, cores: int | None = None) -> int:
    """Torch intra-op threads for a shard process: the CPUs its bundle holds (whole ones, at least one), no more
    than the cores this process may run on. Without it every shard on a node takes all the cores."""
    return max(1, min(int(assigned_cpus or 1), usable_cores() if cores is None else cores))


def pass_threads(num_tokens: int, own: int, prefill: int) -> int:
    """Torch threads for an attention shard's forward pass of ``num_tokens`` tokens: ``prefill`` (at least
    ``own``) from ``PREFILL_MIN_TOKENS`` on, else ``own`` (the shard's threads).

    A prefill pass is bound by compute, and while its dense layers run the expert shards have nothing to do; a
    decode pass is bound by reading weights, and its expert exchanges come every few milliseconds. On this
    project's 2-core machines (one attention and two expert shards on the same two cores, the bench checkpoint)
    ``benchmarks/bench_serve.py`` measured TTFT p50 1051, 1080, 1105 ms with one thread and 902, 960, 921 with
    two, in alternating runs; output throughput went up by 1-5%, TPOT stayed within noise."""
    return max(own, prefill) if num_tokens >= PREFILL_MIN_TOKENS else own


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

    def __init__(self, config: EngineConfig, placement,
                 publish: Callable[[list[RequestOutput], dict[str, str]], None] | None = None,
                 report_load: Callable[[dict], None] | None = None):
        self.placement = placement
        self.publish = publish or (lambda outputs, errors: None)
        self.report_load = report_load or (lambda stats: None)
        self._stats_sent = 0.0
        self.dispatchers: list[AttentionDispatcher] = []  # one per lane
        self._lanes = _Lanes()
        self.engine = LLMEngine(config, expert_ids=[], routed_fn=self._routed)
        self.model_config = self.engine.model_config
        self.hidden_dtype = resolve_dtype(config.dtype)
        self._inbox: list[tuple[str, object]] = []  # ("add", NewRequest) | ("abort", request id)
        self._inbox_lock = threading.Lock()
        self._num_queued = 0
        self.cache = self.engine.cache_stats()  # after the last step (read from other threads)
        self.num_requests = 0  # admitted and not finished (read from other threads)
        self.timings = {"step_s": 0.0, "a2a_s": 0.0, "num_steps": 0, "lanes": 0, "prefill_passes": 0}
        # the shard's own torch threads (its actor set them), and those of its prefill passes (CPU only)
        self.threads = torch.get_num_threads()
        self.prefill_threads = max(self.threads, config.prefill_threads or usable_cores()) \
            if self.engine.device.type == "cpu" else self.threads

    # ---- any thread -------------------------------------------------------------------------------------------

    def add(self, req: NewRequest) -> None:
        with self._inbox_lock:
            self._inbox.append(("add", req))
            self._num_queued += 1

    def abort(self, request_id: str) -> None:
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))

    # ---- the step loop's thread -------------------------------------------------------------------------------

    @property
    def dispatcher(self) -> AttentionDispatcher | None:
        return self.dispatchers[0] if self.dispatchers else None

    def connect(self, comm: Communicator, group: Group) -> None:
        """Join a (new) collective group; the ranks may have moved, and the expert placement with them (the
        group's, when it carries one). Statistics carry over."""
        c = self.model_config
        if group.placement is not None:
            self.placement = group.placement
        previous = self.dispatchers
        stats, lock = (previous[0].stats, previous[0].lock) if previous else (None, None)
        self.dispatchers = [AttentionDispatcher(lane, self.placement, group.expert_ranks, c.num_experts_per_tok,
                                                c.n_routed_experts, stats=stats, lock=lock,
                                                padded_max_tokens=self.engine.config.padded_dispatch_tokens,
                                                first_layer=min(c.moe_layers, default=None))
                            for lane in open_lanes(comm, max_lanes(self.engine.config))]
        self.dispatchers[0].a2a_seconds = sum(d.a2a_seconds for d in previous)

    def num_work(self) -> int:
        return len(self.engine.requests) + self._num_queued

    def lanes_wanted(self) -> int:
        """Micro-batches for the next step (the group runs the most any member wants)."""
        if len(self.dispatchers) < 2:
            return 1
        if self.engine.config.micro_batches == 2:
            return 2
        return 2 if self.num_work() >= AUTO_MICRO_BATCH_REQUESTS else 1

    def _routed(self, layer, h, topk_ids, topk_weights):
        assert self.dispatcher is not None, "attention shard stepped before its collective group was formed"
        return self.dispatcher.dispatch(layer, h, topk_ids, topk_weights)

    def _execute(self, lanes: int, chunks: list) -> torch.Tensor:
        """The forward pass of the step's chunks, as ``lanes`` micro-batches (logits in the chunks' order)."""
        parts = split_chunks(chunks, lanes)

        threads = [pass_threads(sum(c.num_tokens for c in part), self.threads, self.prefill_threads)
                   for part in parts]
        self.timings["prefill_passes"] += sum(n > self.threads for n in threads)

        def lane(k: int) -> torch.Tensor:
            if not parts[k]:  # nothing for this lane: it still joins every exchange
                self._idle_lane(k)
                return torch.empty(0, self.model_config.vocab_size, device=self.engine.device)
            if threads[k] != torch.get_num_threads():  # the lane thread's own (OpenMP's and MKL's are per thread)
                torch.set_num_threads(threads[k])
            return self.engine.runner.execute(parts[k], self.dispatchers[k].dispatch)

        return torch.cat(self._lanes.run(lane, lanes))

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

    def step(self, lanes: int = 1) -> None:
        start = time.perf_counter()
        lanes = min(lanes, len(self.dispatchers))
        a2a_before = sum(d.a2a_seconds for d in self.dispatchers)
        outputs, errors = self._apply_inbox()
        if outputs or errors:  # aborts and refusals are final whatever the step does
            self.publish(outputs, errors)
        passes = self.engine.num_forward_passes
        outputs = self.engine.step(execute=functools.partial(self._execute, lanes))
        if self.engine.num_forward_passes == passes:
            self.idle_pass(lanes)
        self.cache = self.engine.cache_stats()
        self.num_requests = len(self.engine.requests)
        self.timings["step_s"] += time.perf_counter() - start
        # lane-seconds: with two micro-batches, both lanes' waits count
        self.timings["a2a_s"] += sum(d.a2a_seconds for d in self.dispatchers) - a2a_before
        self.timings["num_steps"] += 1
        self.timings["lanes"] += lanes
        if outputs:
            self.publish(outputs, {})
        if time.monotonic() - self._stats_sent >= self.STATS_INTERVAL_S or not self.engine.has_unfinished:
            self._stats_sent = time.monotonic()
            self.report_load(self.stats())

    def idle_pass(self, lanes: int = 1) -> None:
        """Join every MoE layer's exchange with no tokens, on each lane, so the expert shards and the other
        attention shards are not left waiting."""
        self._lanes.run(self._idle_lane, lanes)

    def _idle_lane(self, lane: int) -> None:
        c = self.model_config
        empty = torch.empty(0, c.hidden_size, dtype=self.hidden_dtype, device=self.engine.device)
        ids = torch.empty(0, c.num_experts_per_tok, dtype=torch.long, device=self.engine.device)
        weights = torch.empty(0, c.num_experts_per_tok, dtype=torch.float32, device=self.engine.device)
        for layer in c.moe_layers:
            self.dispatchers[lane].routed(layer, empty, ids, weights)

    def stats(self) -> dict:
        return self.dispatcher.stats.as_dict() if self.dispatcher else {}

    def cache_stats_and_limits(self) -> dict:
        return self.cache | {"max_model_len": self.engine.max_model_len, "num_requests": self.num_requests}


@dataclass
class ExpertSlots:
    """The routed experts an expert shard holds under one placement: each MoE layer's ``RoutedExperts`` (the
    distinct experts of the shard's slots, in id order) and ``slot_map [P]``, the index there of each placement
    slot (the dispatched rows carry placement slots; copies and rebalanced placements order slots freely)."""

    version: int
    expert_ids: list[int]  # per placement slot (-1: empty)
    moe_layers: list
    slot_map: torch.Tensor


class ExpertShard:
    def __init__(self, config: EngineConfig, placement: ReplicatedPlacement, shard: int):
        """This shard loads its slots of ``placement``."""
        self.shard, self.engine_config = shard, config
        self.dtype = resolve_dtype(config.dtype)
        self.device = torch.device(config.device)
        self.timings = {"step_s": 0.0, "compute_s": 0.0, "num_steps": 0, "load_s": 0.0}
        self.slots = self._load(placement)
        self._staged: ExpertSlots | None = None  # the next placement's experts, loaded ahead of its epoch
        self._stage_lock = threading.Lock()
        self.max_lanes = max_lanes(config)
        self.comms: list[Communicator] = []  # one per lane
        self.attention_ranks: list[int] | None = None  # the ranks that send rows (from the group)
        self._lanes = _Lanes()
        self.num_rows = 0

    def _load(self, placement) -> ExpertSlots:
        """This shard's experts under ``placement``, from the checkpoint."""
        start = time.perf_counter()
        slots = placement.experts_on(self.shard)
        held = sorted({e for e in slots if e >= 0})
        model = load_model(self.engine_config.model, dtype=self.dtype, attention=False, expert_ids=held,
                           device=self.device)
        set_kernels(model, kernel_family(self.engine_config.kernels, self.device))
        self.config = model.config
        slot_map = torch.tensor([held.index(e) if e >= 0 else -1 for e in slots], dtype=torch.long,
                                device=self.device)
        loaded = ExpertSlots(placement.version, slots,
                             [layer.mlp.experts for layer in model.model.layers if layer.is_moe], slot_map)
        self.timings["load_s"] += time.perf_counter() - start
        return loaded

    def prepare(self, placement) -> dict:
        """Load this shard's experts under ``placement`` next to those in use (any thread; the steps go on). The
        switch happens when a group with that placement is connected. Returns what changed and how long it took."""
        with self._stage_lock:
            if placement.version == self.slots.version:
                return {"version": placement.version, "loaded": False, "load_s": 0.0}
            start = time.perf_counter()
            staged = self._load(placement) if placement.experts_on(self.shard) != self.slots.expert_ids else \
                dataclasses.replace(self.slots, version=placement.version)  # the same experts, the same weights
            self._staged = staged
            return {"version": placement.version, "loaded": staged.moe_layers is not self.slots.moe_layers,
                    "load_s": round(time.perf_counter() - start, 3)}

    @property
    def comm(self) -> Communicator | None:
        return self.comms[0] if self.comms else None

    def connect(self, comm: Communicator, group: Group) -> None:
        placement = group.placement
        if placement is not None and placement.version != self.slots.version:
            with self._stage_lock:
                staged = self._staged
            if staged is None or staged.version != placement.version:  # not prepared (a replacement shard)
                self.prepare(placement)
                staged = self._staged
            self.slots, self._staged = staged, None
        self.attention_ranks = group.attention_ranks
        self.comms = open_lanes(comm, self.max_lanes)

    def num_work(self) -> int:
        return 0

    def lanes_wanted(self) -> int:
        return 1  # the attention shards decide

    def step(self, lanes: int = 1) -> None:
        """Serve one step: every MoE layer's exchange, in order, on each lane (two lanes: two threads)."""
        assert self.comms, "expert shard stepped before its collective group was formed"
        start = time.perf_counter()
        done = self._lanes.run(self._serve_lane, min(lanes, len(self.comms)))
        self.num_rows += sum(rows for rows, _ in done)
        self.timings["step_s"] += time.perf_counter() - start
        self.timings["compute_s"] += sum(seconds for _, seconds in done)  # lane-seconds
        self.timings["num_steps"] += 1

    @torch.no_grad()
    def _serve_lane(self, lane: int) -> tuple[int, float]:
        rows, compute = 0, 0.0
        slots = self.slots
        pass_tokens = None  # each attention shard's tokens in this pass, from the first MoE layer's counts
        for experts in slots.moe_layers:
            n, seconds, pass_tokens = expert_exchange(
                self.comms[lane], experts, self.config.hidden_size, self.config.num_experts_per_tok, self.dtype,
                self.device, slots.slot_map, self.attention_ranks, self.engine_config.padded_dispatch_tokens,
                pass_tokens)
            rows, compute = rows + n, compute + seconds
        return rows, compute
