"""The router actor: one per cluster. It places the shards, forms their collective group, admits
requests (tokenized and validated here, so a bad one never reaches a shard), assigns each to an
attention shard, drives the lockstep step loop and streams outputs back to callers.

Per step it makes one Ray call per shard, whatever the number of layers: the call carries the
shard's new requests and aborts, and brings back its outputs and cache statistics. The step's
tensors go through the collective group, never through Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator

import ray

from latentmoe.actors.metrics import ServingMetrics
from latentmoe.actors.placement import place_shards
from latentmoe.actors.shard import ShardActor
from latentmoe.cluster.communicator import backend_for
from latentmoe.cluster.dispatch import DispatchStats
from latentmoe.cluster.engine import RequestOutput, tokenize_prompt
from latentmoe.cluster.engine_config import EngineConfig
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.cluster.router_state import OverloadedError, RouterState
from latentmoe.cluster.sampling_params import SamplingParams
from latentmoe.cluster.shards import NewRequest
from latentmoe.cluster.telemetry import ExpertLoadWindow, RequestTimes
from latentmoe.model.config import ModelConfig
from latentmoe.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Router:
    def __init__(self, config: dict, num_attention: int, num_expert: int, *, start_timeout_s: float = 300.0,
                 step_timeout_s: float = 120.0, max_num_requests: int = 1024):
        self.engine_config = EngineConfig.from_dict(config)
        self.config_dict = config
        self.num_attention, self.num_expert = num_attention, num_expert
        self.start_timeout_s, self.step_timeout_s = start_timeout_s, step_timeout_s
        if not isinstance(max_num_requests, int) or max_num_requests < 1:
            raise ValueError(f"max_num_requests must be a positive integer, got {max_num_requests!r}")
        self.max_num_requests = max_num_requests  # admitted and unfinished, over all shards
        self._started: asyncio.Future | None = None
        self.model_config = ModelConfig.from_json(self.engine_config.model)
        if self.model_config.n_routed_experts is None:
            raise ValueError("a dense model has no routed experts to put on expert shards")
        self.placement = ExpertPlacement.build(self.model_config, num_expert)
        try:
            self.tokenizer = Tokenizer.from_dir(self.engine_config.model)
        except FileNotFoundError:
            self.tokenizer = None
        self.state = RouterState(num_attention)
        self.streams: dict[str, asyncio.Queue] = {}
        self.ids = itertools.count()
        self.attention: list = []
        self.experts: list = []
        self.placement_warning: str | None = None
        self.max_model_len = 0
        self.error: str | None = None
        self.num_steps = 0
        self.num_step_calls = 0  # Ray calls made by the step loop
        # summed over steps: the router's round trip, the slowest shard, the attention side's time in the
        # collectives (max over attention shards) and the expert side's time in its experts (max over shards)
        self.timings = {"step_wall_s": 0.0, "shard_max_s": 0.0, "attention_a2a_s": 0.0, "attention_step_s": 0.0,
                        "expert_compute_s": 0.0}
        c = self.model_config
        self.load = ExpertLoadWindow(c.n_routed_experts, num_expert, c.num_experts_per_tok)
        self.times: dict[str, RequestTimes] = {}
        self.metrics = ServingMetrics()
        self._gauges_set = 0.0
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    # ---- start-up ---------------------------------------------------------------------------------------------

    async def start(self) -> dict:
        """Place the shards, load them, form the collective group; returns ``shard_info()``.

        Idempotent: every ingress replica of a Serve application calls it; the first does the work.
        """
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
        return await asyncio.shield(self._started)

    async def _start(self) -> dict:
        gpu = self.engine_config.device.startswith("cuda")
        self.pg, strategies, self.placement_warning = await place_shards(
            self.num_attention, self.num_expert, gpu, timeout_s=min(60.0, self.start_timeout_s))
        expert_ranks = list(range(self.num_attention, self.num_attention + self.num_expert))
        resources = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
        self.attention = [
            ShardActor.options(scheduling_strategy=strategies[i], name=None, **resources).remote(
                "attention", self.config_dict, self.placement, i, expert_ranks)
            for i in range(self.num_attention)]
        self.experts = [
            ShardActor.options(scheduling_strategy=strategies[self.num_attention + i], **resources).remote(
                "expert", self.config_dict, self.placement, i, expert_ranks)
            for i in range(self.num_expert)]
        shards = self.attention + self.experts
        self.info = await self._gather([s.info.remote() for s in shards], self.start_timeout_s, "shard start-up")
        backend = backend_for(self.engine_config.device)
        rendezvous = await self._gather([shards[0].rendezvous.remote(backend)], 30.0, "rendezvous")
        await self._gather([s.connect.remote(backend, rank, len(shards), rendezvous[0], self.step_timeout_s)
                            for rank, s in enumerate(shards)], 120.0, "collective group")
        caches = await self._gather([s.execute.remote("cache_stats_and_limits") for s in self.attention], 30.0,
                                    "cache statistics")
        for shard, cache in zip(self.state.shards, caches):
            shard.cache = cache
        self.max_model_len = min(c["max_model_len"] for c in caches)
        return self.shard_info()

    async def _gather(self, refs, timeout_s: float, what: str):
        try:
            return await asyncio.wait_for(asyncio.gather(*refs), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{what} did not finish within {timeout_s:g} s") from None

    def shard_info(self) -> dict:
        return {"attention": self.info[: self.num_attention], "expert": self.info[self.num_attention:],
                "model": self.engine_config.model, "vocab_size": self.model_config.vocab_size,
                "placement_warning": self.placement_warning, "max_model_len": self.max_model_len,
                "experts_per_shard": [self.placement.experts_on(s) for s in range(self.num_expert)],
                "max_devices_per_token": self.placement.max_devices_per_token}

    # ---- requests ---------------------------------------------------------------------------------------------

    def _submit(self, prompt, params: SamplingParams | None, request_id: str | None) -> tuple[str, asyncio.Queue]:
        if self.error is not None:
            raise RuntimeError(f"the cluster is down: {self.error}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        try:
            ids = tokenize_prompt(self.tokenizer, self.model_config.vocab_size, self.max_model_len, prompt)
        except ValueError:
            self.metrics.requests.inc(tags={"status": "invalid"})
            raise
        if len(self.state.shard_of) >= self.max_num_requests:
            self.metrics.requests.inc(tags={"status": "overloaded"})
            raise OverloadedError(f"the server is at capacity ({self.max_num_requests} requests in flight); "
                                  "retry later")
        request_id = request_id or f"r-{next(self.ids)}"
        if request_id in self.streams:
            raise ValueError(f"request id {request_id!r} is already running")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        self.state.add(NewRequest(request_id, ids, params))
        self.times[request_id] = RequestTimes(time.monotonic())
        self._kick()
        return request_id, queue

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (call with ``num_returns="streaming"``); the last has ``finished``.

        Bad input raises ``ValueError`` before anything is yielded. A caller that cancels aborts the request.
        """
        request_id, queue = self._submit(prompt, params, request_id)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    async def generate_all(self, prompts: list, params: list[SamplingParams | None]) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts. Nothing runs if one is bad."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        for p, sp in zip(prompts, params):  # validate all before submitting any
            if not isinstance(sp, (SamplingParams, type(None))):
                raise TypeError(f"sampling params must be a SamplingParams, got {type(sp).__name__}")
            tokenize_prompt(self.tokenizer, self.model_config.vocab_size, self.max_model_len, p)

        async def run(prompt, sp):
            final = None
            async for out in self.generate(prompt, sp):
                final = out
            return final

        return list(await asyncio.gather(*(run(p, sp) for p, sp in zip(prompts, params))))

    async def abort(self, request_id: str) -> bool:
        return self._abort(request_id)

    def _abort(self, request_id: str) -> bool:
        found = self.state.abort(request_id)
        if found and request_id not in self.state.shard_of:  # it never reached a shard
            self._finished(request_id, "abort", time.monotonic())
        self._kick()
        return found

    # ---- the step loop ----------------------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    async def _step_loop(self) -> None:
        while True:
            if not self.state.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            inputs = self.state.take_step_inputs()
            start = time.perf_counter()
            refs = [a.execute.remote("step", new, aborts) for a, (new, aborts) in zip(self.attention, inputs)]
            refs += [e.execute.remote("step") for e in self.experts]
            self.num_step_calls += len(refs)
            try:
                results = await asyncio.wait_for(asyncio.gather(*refs), self.step_timeout_s)
            except Exception as e:  # a dead shard or a stuck step: fail the requests, never hang them
                self._fail_all(f"step failed: {e!r}" if not isinstance(e, asyncio.TimeoutError)
                               else f"step did not finish within {self.step_timeout_s:g} s")
                continue
            self.num_steps += 1
            self.timings["step_wall_s"] += time.perf_counter() - start
            self.timings["shard_max_s"] += max(r.seconds for r in results)
            attention = results[: self.num_attention]
            self.timings["attention_a2a_s"] += max(r.a2a_seconds for r in attention)
            self.timings["attention_step_s"] += max(r.seconds for r in attention)
            self.timings["expert_compute_s"] += max((r.compute_seconds for r in results[self.num_attention:]),
                                                    default=0.0)
            now = time.monotonic()
            for i, (shard, result) in enumerate(zip(self.state.shards, results[: self.num_attention])):
                shard.cache = result.cache
                for request_id, message in result.errors.items():
                    self._deliver(request_id, ValueError(message))
                    self._finished(request_id, "invalid", now)
                for out in result.outputs:
                    self._deliver(out.request_id, out)
                    self._observe(out, now)
                if result.dispatch is not None:
                    self._record_load(i, result.dispatch)
            if time.monotonic() - self._gauges_set >= 1.0 or not self.state.has_work:
                self._set_gauges()

    # ---- telemetry ----------------------------------------------------------------------------------------------

    def _observe(self, out: RequestOutput, now: float) -> None:
        times = self.times.get(out.request_id)
        if times is not None:
            ttft, itl = times.on_output(now, len(out.delta_token_ids))
            if ttft is not None:
                self.metrics.ttft.observe(ttft)
            if itl is not None:
                self.metrics.itl.observe(itl)
        if out.delta_token_ids:
            self.metrics.generation_tokens.inc(len(out.delta_token_ids))
        if out.finished:
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            self._finished(out.request_id, out.finish_reason or "stop", now)

    def _finished(self, request_id: str, status: str, now: float) -> None:
        self.state.done(request_id)
        times = self.times.pop(request_id, None)
        if times is not None:
            self.metrics.e2e.observe(now - times.arrival)
        self.metrics.requests.inc(tags={"status": status})

    def _record_load(self, shard: int, snapshot: dict) -> None:
        delta = self.load.update(shard, snapshot)
        if delta is None:
            return
        for s, n in enumerate(delta.tokens_per_shard):
            if n:
                self.metrics.shard_tokens.inc(n, tags={"shard": str(s)})
        for devices, n in enumerate(delta.devices_histogram):
            if n:
                self.metrics.devices.inc(n, tags={"devices": str(devices)})
        if delta.a2a_bytes:
            self.metrics.a2a_bytes.inc(delta.a2a_bytes)

    def _set_gauges(self) -> None:
        self._gauges_set = time.monotonic()
        caches = [s.cache for s in self.state.shards]
        self.metrics.waiting.set(sum(c.get("num_waiting", 0) for c in caches))
        self.metrics.running.set(sum(c.get("num_running", 0) for c in caches))
        for i, c in enumerate(caches):
            if c.get("num_blocks"):
                self.metrics.cache_usage.set(1 - c["num_free_blocks"] / c["num_blocks"], tags={"shard": str(i)})
        recent = self.load.summary(10.0)
        for layer, value in recent["imbalance_per_layer"].items():
            self.metrics.layer_imbalance.set(value, tags={"layer": layer})
        self.metrics.shard_imbalance.set(recent["shard_imbalance"])

    async def expert_load(self, window_s: float = 60.0) -> dict:
        """The (layer x expert) counts, per-shard load and devices per token over the last ``window_s`` seconds."""
        if not isinstance(window_s, (int, float)) or not 0 < window_s <= self.load.horizon_s:
            raise ValueError(f"window_s must be in (0, {self.load.horizon_s:g}], got {window_s!r}")
        return self.load.summary(float(window_s)) | {
            "max_devices_per_token": self.placement.max_devices_per_token,
            "experts_per_shard": [self.placement.experts_on(s) for s in range(self.num_expert)]}

    def _fail_all(self, message: str) -> None:
        logger.error("latentmoe cluster: %s", message)
        self.error = message
        for request_id in list(self.state.shard_of):
            self._deliver(request_id, RuntimeError(message))
            self._finished(request_id, "error", time.monotonic())
        for shard in self.state.shards:
            shard.new, shard.aborts = [], []

    # ---- statistics -------------------------------------------------------------------------------------------

    async def dispatch_stats(self) -> dict:
        """Expert load and all-to-all traffic, summed over attention shards."""
        parts = await self._gather([a.execute.remote("stats") for a in self.attention], 30.0, "statistics")
        c = self.model_config
        total = DispatchStats(c.n_routed_experts, self.num_expert, c.num_experts_per_tok)
        for part in parts:
            total.merge(DispatchStats.from_dict(part, c.n_routed_experts, self.num_expert, c.num_experts_per_tok))
        return total.as_dict() | {"max_devices_per_token": self.placement.max_devices_per_token}

    async def cache_stats(self) -> dict:
        shards = [s.cache for s in self.state.shards]
        return {
            "block_size": shards[0]["block_size"], "bytes_per_token": shards[0]["bytes_per_token"],
            "num_blocks": sum(s["num_blocks"] for s in shards),
            "num_free_blocks": sum(s["num_free_blocks"] for s in shards),
            "num_running": sum(s.get("num_running", 0) for s in shards),
            "num_waiting": sum(s.get("num_waiting", 0) for s in shards),
            "shards": shards,
        }

    async def counters(self) -> dict:
        return {"num_steps": self.num_steps, "num_step_calls": self.num_step_calls, **self.timings,
                "num_live_requests": len(self.state.shard_of)}

    async def shard_calls(self) -> list[int]:
        """Step calls each shard has received (counted by the shards)."""
        return await self._gather([s.steps_received.remote() for s in self.attention + self.experts], 30.0,
                                  "shard counters")

    async def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._loop_task is not None:
            self._loop_task.cancel()
        for actor in self.attention + self.experts:
            ray.kill(actor)
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)


RouterActor = ray.remote(Router)
