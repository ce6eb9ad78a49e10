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
from latentmoe.engine.engine import RequestOutput, tokenize_prompt
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.cluster.router_state import NoShardError, OverloadedError, RouterState
from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.cluster.shards import NewRequest
from latentmoe.cluster.telemetry import ExpertLoadWindow, RequestTimes
from latentmoe.model.config import ModelConfig
from latentmoe.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class _Fatal(Exception):
    """A fault the cluster cannot recover from (an expert shard that cannot be replaced)."""


class _Lost(Exception):
    def __init__(self, lost):
        super().__init__(f"{len(lost)} shard(s) lost while recovering")
        self.lost = lost


class Router:
    def __init__(self, config: dict, num_attention: int, num_expert: int, *, start_timeout_s: float = 300.0,
                 step_timeout_s: float = 120.0, max_num_requests: int = 1024, recovery_timeout_s: float | None = None,
                 fault_grace_s: float = 10.0):
        self.engine_config = EngineConfig.from_dict(config)
        self.config_dict = config
        self.num_attention, self.num_expert = num_attention, num_expert
        self.start_timeout_s, self.step_timeout_s = start_timeout_s, step_timeout_s
        # how long a replacement shard may take to come up (load its weights); then it is given up
        self.recovery_timeout_s = start_timeout_s if recovery_timeout_s is None else recovery_timeout_s
        self.fault_grace_s = fault_grace_s  # after one shard fails a step, how long the others get to return
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
        self.requests: dict[str, NewRequest] = {}  # every live request as admitted
        self.progress: dict[str, tuple[list[int], int]] = {}  # request id -> (tokens, characters) its client has
        self.num_recoveries = 0
        self.faults: list[dict] = []  # the most recent faults: what failed, what was done, how long it took
        self._failed_steps_in_a_row = 0
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
        self.pg, self.strategies, self.placement_warning = await place_shards(
            self.num_attention, self.num_expert, gpu, timeout_s=min(60.0, self.start_timeout_s))
        self.shard_resources = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
        self.backend = backend_for(self.engine_config.device)
        self.attention = [self._new_shard("attention", i) for i in range(self.num_attention)]
        self.experts = [self._new_shard("expert", i) for i in range(self.num_expert)]
        shards = self.attention + self.experts
        self.info = await self._gather([s.info.remote() for s in shards], self.start_timeout_s, "shard start-up")
        await self._connect_all()
        caches = await self._gather([s.execute.remote("cache_stats_and_limits") for s in self.attention], 30.0,
                                    "cache statistics")
        for shard, cache in zip(self.state.shards, caches):
            shard.cache = cache
        self.max_model_len = min(c["max_model_len"] for c in caches)
        return self.shard_info()

    def _new_shard(self, kind: str, index: int):
        """A shard actor in its bundle of the placement group (a replacement goes where the dead one was)."""
        bundle = index if kind == "attention" else self.num_attention + index
        expert_ranks = list(range(self.num_attention, self.num_attention + self.num_expert))
        return ShardActor.options(scheduling_strategy=self.strategies[bundle], max_restarts=0,
                                  enable_task_events=False,  # a step call per shard per step: not for the GCS
                                  **self.shard_resources).remote(kind, self.config_dict, self.placement, index,
                                                                 expert_ranks)

    async def _connect_all(self) -> None:
        """Form the collective group of the live shards: attention shards first, then expert shards."""
        members = [a for a in self.attention if a is not None] + self.experts
        expert_ranks = list(range(len(members) - len(self.experts), len(members)))
        rendezvous = await self._gather([members[0].rendezvous.remote(self.backend)], 30.0, "rendezvous")
        # a collective waiting on a hung peer gives up after half the step timeout, so that the router, which
        # gives up on the step after the whole of it, finds the live shards returned and the hung one not
        await self._gather([s.connect.remote(self.backend, rank, len(members), rendezvous[0],
                                             self.step_timeout_s / 2, expert_ranks)
                            for rank, s in enumerate(members)],
                           120.0, "collective group")

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
            params.check_vocab(self.model_config.vocab_size)
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
        req = NewRequest(request_id, ids, params)
        try:
            self.state.add(req)
        except NoShardError:
            del self.streams[request_id]
            raise
        self.requests[request_id] = req
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
            try:
                await self._step()
            except Exception as e:  # noqa: BLE001: a bug here must fail requests, never stop the loop silently
                logger.exception("latentmoe router: step loop error")
                self._fail_requests(f"internal error in the router: {e!r}")

    async def _step(self) -> None:
        live = [i for i, a in enumerate(self.attention) if a is not None]
        inputs = self.state.take_step_inputs()
        start = time.perf_counter()
        shards = [("attention", i, self.attention[i]) for i in live]
        shards += [("expert", j, e) for j, e in enumerate(self.experts)]
        refs = [self.attention[i].execute.remote("step", *inputs[i]) for i in live]
        refs += [e.execute.remote("step") for e in self.experts]
        self.num_step_calls += len(refs)
        outcomes = await self._await_step(refs)
        now = time.monotonic()
        if all(not isinstance(o, BaseException) for o in outcomes):
            self._failed_steps_in_a_row = 0
            self.num_steps += 1
            results = outcomes
            self.timings["step_wall_s"] += time.perf_counter() - start
            self.timings["shard_max_s"] += max(r.seconds for r in results)
            attention = results[: len(live)]
            self.timings["attention_a2a_s"] += max(r.a2a_seconds for r in attention)
            self.timings["attention_step_s"] += max(r.seconds for r in attention)
            self.timings["expert_compute_s"] += max((r.compute_seconds for r in results[len(live):]), default=0.0)
            for i, result in zip(live, attention):
                self._take_result(i, result, now)
            if time.monotonic() - self._gauges_set >= 1.0 or not self.state.has_work:
                self._set_gauges()
            return
        # a fault: keep what the shards that finished the step produced, then recover
        for (kind, i, _), outcome in zip(shards, outcomes):
            if kind == "attention" and not isinstance(outcome, BaseException):
                self._take_result(i, outcome, now)
        await self._recover(shards, outcomes, inputs)

    async def _await_step(self, refs) -> list:
        """Each shard's StepResult, or the exception it raised, or ``TimeoutError`` if it is stuck."""

        async def one(ref):
            return await ref

        tasks = [asyncio.ensure_future(one(ref)) for ref in refs]
        done, pending = await asyncio.wait(tasks, timeout=self.step_timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        if pending:
            # one failed, or hangs: the others' collectives fail too, at once when a dead peer's sockets close,
            # within the collective timeout (half the step timeout) when it hangs; give them that moment, so
            # that only the shard at fault is replaced
            _, pending = await asyncio.wait(pending, timeout=self.fault_grace_s)
        outcomes = []
        for t in tasks:
            if t.done():
                outcomes.append(t.exception() or t.result())
            else:
                t.cancel()
                outcomes.append(TimeoutError(f"the step did not finish within {self.step_timeout_s:g} s"))
        return outcomes

    def _take_result(self, i: int, result, now: float) -> None:
        shard = self.state.shards[i]
        shard.cache = result.cache
        for request_id, message in result.errors.items():
            self._deliver(request_id, ValueError(message))
            self._finished(request_id, "invalid", now)
        for out in result.outputs:
            if out.request_id in self.requests:  # progress is kept for live requests only
                self.progress[out.request_id] = (out.token_ids, len(out.text))
            self._deliver(out.request_id, out)
            self._observe(out, now)
        if result.dispatch is not None:
            self._record_load(i, result.dispatch)

    # ---- faults -------------------------------------------------------------------------------------------------

    async def _recover(self, shards, outcomes, inputs) -> None:
        """A step failed. Replace the shards that died or hung, re-form the collective group, move the requests
        of attention shards that are gone, and go on; the next step recomputes what the failed one lost."""
        started = time.monotonic()
        lost = [(kind, i, handle, o) for (kind, i, handle), o in zip(shards, outcomes)
                if isinstance(o, (ray.exceptions.RayActorError, TimeoutError))]
        failed = [(kind, i, o) for (kind, i, _), o in zip(shards, outcomes)
                  if isinstance(o, BaseException) and not isinstance(o, (ray.exceptions.RayActorError, TimeoutError))]
        what = ", ".join(f"{kind} shard {i} {'hung' if isinstance(o, TimeoutError) else 'died'}"
                         for kind, i, _, o in lost) or "the step failed on " + ", ".join(
                             f"{kind} shard {i}" for kind, i, _ in failed)
        logger.warning("latentmoe router: fault: %s; recovering", what)
        for kind, i, _, o in lost:
            self.metrics.shard_faults.inc(tags={"kind": kind})
        # aborts handed to attention shards in the failed step were applied there: those requests are over
        for (kind, i, _), o in zip(shards, outcomes):
            if kind == "attention" and isinstance(o, BaseException):
                for request_id in inputs[i][1]:
                    if request_id in self.requests:
                        self._finished(request_id, "abort", time.monotonic())
        if not lost:
            self._failed_steps_in_a_row += 1
            if self._failed_steps_in_a_row >= 3:  # the same step fails on live shards: not a fault we can mend
                message = f"the step failed {self._failed_steps_in_a_row} times: {failed[0][2]!r}"
                self._fail_requests(message)
                await self._reset_attention()
                self._record_fault(what, "failed the requests in flight", started)
                self._failed_steps_in_a_row = 0
                return
        try:
            for attempt in range(3):
                try:
                    await self._replace(lost)
                    if not any(a is not None for a in self.attention):
                        self._fail_all("every attention shard died and none could be replaced")
                        self._record_fault(what, "no attention shard left: cluster down", started)
                        return
                    await self._connect_checked()
                    break
                except _Lost as e:  # another shard died while recovering: replace it too
                    lost = e.lost
            else:
                raise RuntimeError("the collective group could not be re-formed after 3 attempts")
            await self._reconcile()
        except _Fatal as e:
            self._fail_all(str(e))
            self._record_fault(what, f"cluster down: {e}", started)
            return
        except Exception as e:  # noqa: BLE001
            self._fail_all(f"recovery failed: {e!r}")
            self._record_fault(what, f"cluster down: recovery failed: {e!r}", started)
            return
        self.num_recoveries += 1
        self.metrics.recoveries.inc()
        self._record_fault(what, "recovered", started)
        logger.warning("latentmoe router: recovered from '%s' in %.1f s", what, time.monotonic() - started)

    async def _replace(self, lost) -> None:
        """Kill and replace every lost shard; a lost attention shard's requests move to the others."""
        for kind, i, handle, _ in lost:
            ray.kill(handle)  # dead already, or hung: then make sure it is gone and its bundle free
        fresh = {}
        for kind, i, _, _ in lost:
            fresh[(kind, i)] = self._new_shard(kind, i)
        infos = await asyncio.gather(*(asyncio.wait_for(self._ready(h), self.recovery_timeout_s)
                                       for h in fresh.values()), return_exceptions=True)
        for ((kind, i), handle), info in zip(fresh.items(), infos):
            if isinstance(info, BaseException):
                ray.kill(handle)
                if kind == "expert":
                    raise _Fatal(f"expert shard {i} died and its replacement did not come up: {info!r}")
                logger.error("latentmoe router: attention shard %d died and its replacement did not come up "
                             "(%r): its requests move to the other attention shards", i, info)
                self.attention[i] = None
                self.state.shards[i].alive = False
                self.state.shards[i].cache = {}
                continue
            if kind == "expert":
                self.experts[i] = handle
                self.info[self.num_attention + i] = info
            else:
                self.attention[i] = handle
                self.info[i] = info
                self.state.shards[i].cache = {}
        # the requests of attention shards that were replaced or dropped start again elsewhere
        for kind, i, _, _ in lost:
            if kind == "attention":
                for request_id in list(self.state.shards[i].live):
                    self._move(request_id)

    async def _connect_checked(self) -> None:
        """``_connect_all``; if that fails, find the shards that died meanwhile (``_Lost``)."""
        try:
            await self._connect_all()
        except Exception as error:
            members = [("attention", i, a) for i, a in enumerate(self.attention) if a is not None]
            members += [("expert", j, e) for j, e in enumerate(self.experts)]
            probes = await asyncio.gather(*(asyncio.wait_for(self._ready(h), 10.0) for _, _, h in members),
                                          return_exceptions=True)
            lost = [(kind, i, h, p) for (kind, i, h), p in zip(members, probes) if isinstance(p, BaseException)]
            if lost:
                raise _Lost([(k, i, h, TimeoutError()) for k, i, h, _ in lost]) from error
            raise

    async def _ready(self, handle) -> dict:
        return await handle.info.remote()

    def _move(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        tokens, chars = self.progress.get(request_id, ([], 0))
        if req.params.num_samples > 1 and tokens:  # its samples' progress is not kept: they cannot resume
            self._deliver(request_id, NoShardError("the attention shard of this request (n > 1) failed"))
            self._finished(request_id, "error", time.monotonic())
            return
        moved = NewRequest(request_id, req.prompt_token_ids, req.params, list(tokens), chars)
        try:
            self.state.move(moved)
        except NoShardError:
            pass  # no attention shard is left: _fail_all follows

    async def _reconcile(self) -> None:
        """After re-forming the group: what each live attention shard holds against what the router thinks."""
        live = [i for i, a in enumerate(self.attention) if a is not None]
        held = await self._gather([self.attention[i].execute.remote("request_ids") for i in live], 60.0,
                                  "request lists")
        caches = await self._gather([self.attention[i].execute.remote("cache_stats_and_limits") for i in live], 60.0,
                                    "cache statistics")
        for i, ids, cache in zip(live, held, caches):
            shard = self.state.shards[i]
            shard.cache = cache
            ids = set(ids)
            pending = {r.request_id for r in shard.new}
            for request_id in list(shard.live):
                if request_id not in ids and request_id not in pending:
                    self._move(request_id)  # lost in the failed step (refused, or its shard was replaced)
            stray = [r for r in ids if r not in shard.live]  # finished or aborted on the router's side meanwhile
            shard.aborts.extend(r for r in stray if r not in shard.aborts)

    async def _reset_attention(self) -> None:
        live = [a for a in self.attention if a is not None]
        try:
            await self._gather([a.execute.remote("abort_all") for a in live], 60.0, "reset")
        except Exception:  # noqa: BLE001
            logger.exception("latentmoe router: could not reset the attention shards")

    def _record_fault(self, what: str, outcome: str, started: float) -> None:
        self.faults = (self.faults + [{"time": time.time(), "fault": what, "outcome": outcome,
                                       "seconds": round(time.monotonic() - started, 3)}])[-20:]

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
        self.requests.pop(request_id, None)
        self.progress.pop(request_id, None)
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

    def _fail_requests(self, message: str) -> None:
        """End every request in flight with an error (the client gets 503 / UNAVAILABLE)."""
        logger.error("latentmoe router: failing %d requests: %s", len(self.state.shard_of), message)
        for request_id in list(self.state.shard_of):
            self._deliver(request_id, NoShardError(message))
            self._finished(request_id, "error", time.monotonic())
        for shard in self.state.shards:
            shard.new, shard.aborts = [], []

    def _fail_all(self, message: str) -> None:
        """The cluster cannot go on: fail what is in flight and refuse new requests."""
        self.error = message
        self._fail_requests(message)

    # ---- statistics -------------------------------------------------------------------------------------------

    async def dispatch_stats(self) -> dict:
        """Expert load and all-to-all traffic, summed over attention shards."""
        parts = await self._gather([a.execute.remote("stats") for a in self.attention if a is not None], 30.0,
                                   "statistics")
        c = self.model_config
        total = DispatchStats(c.n_routed_experts, self.num_expert, c.num_experts_per_tok)
        for part in parts:
            total.merge(DispatchStats.from_dict(part, c.n_routed_experts, self.num_expert, c.num_experts_per_tok))
        return total.as_dict() | {"max_devices_per_token": self.placement.max_devices_per_token}

    async def cache_stats(self) -> dict:
        """Summed over the live attention shards (a shard that was dropped has no cache any more)."""
        shards = [s.cache for s in self.state.shards if s.alive and s.cache]
        first = shards[0] if shards else {}
        return {
            "block_size": first.get("block_size"), "bytes_per_token": first.get("bytes_per_token"),
            "num_blocks": sum(s["num_blocks"] for s in shards),
            "num_free_blocks": sum(s["num_free_blocks"] for s in shards),
            "num_running": sum(s.get("num_running", 0) for s in shards),
            "num_waiting": sum(s.get("num_waiting", 0) for s in shards),
            "shards": shards,
        }

    async def counters(self) -> dict:
        return {"num_steps": self.num_steps, "num_step_calls": self.num_step_calls, **self.timings,
                "num_live_requests": len(self.state.shard_of), "num_recoveries": self.num_recoveries,
                "faults": self.faults, "error": self.error,
                "attention_shards_alive": sum(a is not None for a in self.attention),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def shard_calls(self) -> list[int]:
        """Step calls each live shard has received (counted by the shards)."""
        return await self._gather([s.steps_received.remote() for s in self._shards()], 30.0, "shard counters")

    async def shards(self) -> dict:
        """The live shards' actor handles and where they run (for operators, and for fault tests)."""
        infos = await self._gather([s.info.remote() for s in self._shards()], 30.0, "shard info")
        handles = self._shards()
        return {"attention": [(h, i) for h, i in zip(handles, infos) if i["kind"] == "attention"],
                "expert": [(h, i) for h, i in zip(handles, infos) if i["kind"] == "expert"]}

    def _shards(self) -> list:
        return [a for a in self.attention if a is not None] + self.experts

    async def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._loop_task is not None:
            self._loop_task.cancel()
        for actor in self._shards():
            ray.kill(actor)
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)


RouterActor = ray.remote(Router)
