"""The attention shard: a whole engine over the attention side, in a Ray process of its own.

``AttentionServer`` is the shard inside its process: it registers with the coordinator, long-polls it
for new groups (``watch``), runs the lockstep step loop on a thread, and sends each step's outputs to each
consumer in one message (``latentmoe.actors.outputs``), the request's Ray call ending once its last output
is sent. A call without a ticket gets its outputs as the call's own stream instead, one item per step at
most (what piled up while the caller was busy goes as one).
Two thin shells hold it: ``AttentionShardDeployment``, the Ray Serve deployment that Serve autoscales
(each replica one shard, placed on an attention node), and ``AttentionShardActor``, a plain actor for
the offline ``LLM``. A request's stream ending early (its caller cancelled, or died) aborts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid

import ray

from latentmoe.actors.metrics import ShardMetrics
from latentmoe.actors.names import ROUTER_NAMESPACE
from latentmoe.actors.outputs import Outbox, Ticket
from latentmoe.cluster.membership import ATTENTION, Member
from latentmoe.cluster.shards import AttentionShard, NewRequest, shard_threads
from latentmoe.cluster.step_loop import Doorbell, StepLoop
from latentmoe.engine.engine import RequestOutput, coalesce
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OverloadedError(RuntimeError):
    """The shard is at its bound on requests in flight: HTTP 503 / gRPC RESOURCE_EXHAUSTED at the edge."""


class ShardGoneError(RuntimeError):
    """This shard is leaving (drained) or lost its cluster: the caller moves the request to another shard."""


class AttentionServer:
    def __init__(self, config: dict, coordinator_name: str, *, max_num_requests: int = 256,
                 collective_timeout_s: float = 60.0, start_timeout_s: float = 300.0, member_id: str | None = None,
                 coordinator_args: dict | None = None):
        """``coordinator_args``: to create the coordinator if this shard comes up first (``start_coordinator``'s
        keywords); without them it must exist."""
        import torch

        torch.set_num_threads(shard_threads(ray.get_runtime_context().get_assigned_resources().get("CPU")))
        self.max_num_requests = max_num_requests
        if coordinator_args is not None:
            from latentmoe.actors.cluster import start_coordinator

            self.coordinator = start_coordinator(config, name=coordinator_name, timeout_s=start_timeout_s,
                                                 **coordinator_args)
        else:
            self.coordinator = ray.get_actor(coordinator_name, namespace=ROUTER_NAMESPACE)
        self.start_timeout_s = start_timeout_s
        info = ray.get(self.coordinator.start.remote(), timeout=start_timeout_s)
        self.member_id = member_id or f"attention-{uuid.uuid4().hex[:8]}"
        self.metrics = ShardMetrics()
        # request id -> its call's event loop, the queue the call reads, and its ticket (None: the call streams)
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, Ticket | None]] = {}
        self.outbox = Outbox(on_unreachable=self._unreachable)
        self.shard = AttentionShard(EngineConfig.from_dict(config), info["placement"], publish=self._publish,
                                    report_load=self._report_load)
        self.doorbell = Doorbell(ray.util.get_node_ip_address())
        ctx = ray.get_runtime_context()
        self.member = Member(self.member_id, ATTENTION, ctx.get_node_id(), self.doorbell.address)
        self.steps = StepLoop(self.shard, self.member_id, self.doorbell, collective_timeout_s=collective_timeout_s,
                              on_joined=lambda epoch: self.coordinator.joined.remote(self.member_id, epoch),
                              on_fault=lambda epoch, error: self.coordinator.fault.remote(self.member_id, epoch,
                                                                                           error))
        self.consumers: dict[str, object] = {}  # request id -> its caller's actor, when given
        self._watchdog: asyncio.Task | None = None
        self.draining = False
        self.error: str | None = None
        self._closed = False
        self._register()
        self._watcher = threading.Thread(target=self._watch, name="latentmoe-watch", daemon=True)
        self._watcher.start()
        threading.Thread(target=self._gauges, name="latentmoe-gauges", daemon=True).start()

    # ---- the control plane ----------------------------------------------------------------------------------

    def _register(self) -> None:
        info = {"max_model_len": self.shard.engine.max_model_len, "pid": os.getpid(), "cache": self.shard.cache,
                "node_id": self.member.node_id, "node_ip": ray.util.get_node_ip_address()}
        ray.get(self.coordinator.register.remote(self.member, info, ray.get_runtime_context().current_actor,
                                                 self.steps.group), timeout=self.start_timeout_s)

    def _watch(self) -> None:
        """Long-poll the coordinator for new groups; after it restarts, register again."""
        known, incarnation = 0, None
        while not self._closed and not self.steps.left.is_set():
            try:
                reply = ray.get(self.coordinator.watch.remote(self.member_id, known), timeout=60)
            except Exception as e:  # noqa: BLE001: the coordinator died (Ray restarts it) or is slow
                logger.warning("latentmoe %s: coordinator unreachable (%r); registering again", self.member_id, e)
                time.sleep(1.0)
                try:
                    self._register()
                except Exception:  # noqa: BLE001
                    pass
                continue
            if incarnation is not None and reply["incarnation"] != incarnation:  # it restarted: say we are here
                logger.warning("latentmoe %s: the coordinator restarted; registering again", self.member_id)
                self._register()
            incarnation = reply["incarnation"]
            if reply["error"] is not None:
                self._fail_all(f"the cluster is down: {reply['error']}")
            group = reply["group"]
            if group is not None and group.epoch > known:
                known = group.epoch
                self.steps.assign(group)

    def _report_load(self, stats: dict) -> None:  # the step thread, about once a second
        timings = self.shard.timings
        cache = self.shard.cache | {"step_s": timings["step_s"], "num_steps": timings["num_steps"]}
        self.coordinator.report_load.remote(self.member_id, stats, cache)

    def _gauges(self) -> None:
        """Ray drops a gauge's value at each scrape unless it is set again: set them every 2 s, idle or not."""
        while not self._closed and not self.steps.left.is_set():
            self._set_gauges(self.shard.cache)
            time.sleep(2.0)

    def _set_gauges(self, cache: dict) -> None:
        self.metrics.waiting.set(cache.get("num_waiting", 0), tags={"shard": self.member_id})
        self.metrics.running.set(cache.get("num_running", 0), tags={"shard": self.member_id})
        if cache.get("num_blocks"):
            self.metrics.cache_usage.set(1 - cache["num_free_blocks"] / cache["num_blocks"],
                                         tags={"shard": self.member_id})

    # ---- requests -------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       output_token_ids: list[int] | None = None, num_output_chars: int = 0, consumer=None,
                       ticket: Ticket | None = None):
        """Run one request. With a ``ticket`` its outputs go to the caller's inbox, batched per step with the
        caller's other requests, and this stream ends, yielding nothing, once the last is sent; without one they
        are this stream's items (the last has ``finished``). ``output_token_ids``: what the caller already has
        from a shard that failed or drained (recomputed here; the outputs go on after them). ``consumer``: the
        caller's actor (an ingress replica); if it dies, the request is aborted."""
        if self.error is not None or self.draining:
            raise ShardGoneError(self.error or f"attention shard {self.member_id} is draining")
        if self.shard.num_work() >= self.max_num_requests:
            raise OverloadedError(f"the attention shard is at capacity ({self.max_num_requests} requests in "
                                  "flight); retry later")
        if request_id in self.streams:
            raise ValueError(f"request id {request_id!r} is already running")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (asyncio.get_running_loop(), queue, ticket)
        if consumer is not None:
            self.consumers[request_id] = consumer
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.get_running_loop().create_task(self._watch_consumers())
        self.shard.add(NewRequest(request_id, list(prompt_token_ids), params, list(output_token_ids or []),
                                  num_output_chars))
        self.steps.wake()
        finished = False
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                if any(i is _SENT for i in items):  # a ticket's request: its last output is on its way
                    finished = True
                    return
                errors = [i for i in items if isinstance(i, BaseException)]
                outs = [i for i in items if not isinstance(i, BaseException)]
                if outs:
                    out = coalesce(outs)
                    yield out
                    if out.finished:
                        finished = True
                        return
                if errors:
                    raise errors[0]
        finally:
            self.streams.pop(request_id, None)
            self.consumers.pop(request_id, None)
            if not finished:
                self.shard.abort(request_id)
                self.steps.wake()

    async def _watch_consumers(self, period_s: float = 2.0) -> None:
        """Abort the requests whose caller died (an ingress replica killed mid-stream): nothing else tells a
        shard, and their streams would run on to ``max_tokens`` holding cache blocks."""
        while self.consumers:
            await asyncio.sleep(period_s)
            by_actor: dict = {}
            for request_id, consumer in list(self.consumers.items()):
                by_actor.setdefault(consumer._actor_id, (consumer, []))[1].append(request_id)
            for consumer, request_ids in by_actor.values():
                try:
                    await asyncio.wait_for(consumer.__ray_ready__.remote(), 10)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    logger.warning("latentmoe %s: the caller of %d request(s) died; aborting them", self.member_id,
                                   len(request_ids))
                    for request_id in request_ids:
                        entry = self.streams.get(request_id)
                        if entry is not None:
                            entry[1].put_nowait(ShardGoneError("the caller of this request died"))
                except Exception:  # noqa: BLE001: slow to answer is not dead
                    pass

    def _publish(self, outputs: list[RequestOutput], errors: dict[str, str]) -> None:
        """The step thread's outputs: one message per consumer inbox (after it is sent, the calls of the requests
        that finished end), and the calls without a ticket fed on their event loop in one hop."""
        by_loop: dict = {}
        by_inbox: dict = {}  # address -> (authkey, [(request id, attempt, output)], [(loop, queue) of finished])
        for out in outputs:
            entry = self.streams.get(out.request_id)
            if entry is None:
                continue
            loop, queue, ticket = entry
            if ticket is None:
                by_loop.setdefault(loop, []).append((queue, out))
                continue
            _, batch, finished = by_inbox.setdefault(ticket.address, (ticket.authkey, [], []))
            batch.append((out.request_id, ticket.attempt, out))
            if out.finished:
                finished.append((loop, queue))
        for request_id, message in errors.items():
            entry = self.streams.get(request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], ValueError(message)))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)
        for address, (authkey, batch, finished) in by_inbox.items():
            self.outbox.send(address, authkey, batch, _on_sent(finished) if finished else None)

    def _unreachable(self, address) -> None:
        """A consumer's inbox cannot be reached (it died): its requests end, which aborts them."""
        for loop, queue, ticket in list(self.streams.values()):
            if ticket is not None and ticket.address == address:
                loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"the caller's inbox {address} is "
                                                                         "unreachable"))

    def _fail_all(self, message: str) -> None:
        self.error = message
        for loop, queue, _ in list(self.streams.values()):
            loop.call_soon_threadsafe(queue.put_nowait, ShardGoneError(message))

    # ---- state and leaving ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        return self.shard.cache_stats_and_limits() | {
            "member_id": self.member_id, "epoch": self.steps.epoch, "num_steps": self.steps.num_steps,
            "num_idle_rounds": self.steps.num_idle_rounds, "num_wakeups": self.steps.num_wakeups,
            "num_faults": self.steps.num_faults, "open_calls": len(self.streams),
            "dispatch": self.shard.stats(), "timings": dict(self.shard.timings), "pid": os.getpid(),
            "threads": self.shard.threads, "prefill_threads": self.shard.prefill_threads,
            "node_id": self.member.node_id, "draining": self.draining}

    def check_health(self) -> None:
        if self.steps.error is not None:
            raise RuntimeError(f"the step loop stopped: {self.steps.error!r}")
        if self.error is not None:
            raise RuntimeError(self.error)

    def leave(self, grace_s: float = 30.0) -> int:
        """Drain: take no new request, let those in flight finish within ``grace_s``, hand the rest back to
        their callers (``ShardGoneError``: they move them to another shard), then leave the group.
        Returns how many were handed back."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.shard.num_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        handed_back = len(self.streams)
        if handed_back:
            self._fail_all(f"attention shard {self.member_id} left")
        try:
            ray.get(self.coordinator.leave.remote(self.member_id), timeout=30)
            self.steps.left.wait(timeout=self.steps.collective_timeout_s + 30)
        except Exception:  # noqa: BLE001: no coordinator: the others see a fault and re-form without us
            logger.exception("latentmoe %s: could not leave cleanly", self.member_id)
        self.close()
        return handed_back

    def close(self) -> None:
        self._closed = True
        self.steps.stop()
        self.doorbell.close()
        self.outbox.close()


_SENT = object()  # put on a ticket request's queue once its last output went to the inbox


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _on_sent(finished: list):
    """After a message with the last outputs of ``finished`` requests went out: their calls end (or fail)."""

    def on_sent(ok: bool) -> None:
        item = _SENT if ok else RuntimeError("the caller's inbox became unreachable")
        for loop, queue in finished:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return on_sent


@ray.remote
class AttentionShardActor:
    """An attention shard for the offline ``LLM`` (no Serve): the same ``AttentionServer``."""

    def __init__(self, config: dict, coordinator_name: str, **kwargs):
        self.server = AttentionServer(config, coordinator_name, **kwargs)

    async def generate(self, *args, **kwargs):
        async for out in self.server.generate(*args, **kwargs):
            yield out

    def stats(self) -> dict:
        return self.server.stats()

    async def leave(self, grace_s: float = 30.0) -> int:
        return await asyncio.to_thread(self.server.leave, grace_s)


def _deployment():
    from ray import serve

    from latentmoe.actors.names import ATTENTION_DEPLOYMENT

    @serve.deployment(name=ATTENTION_DEPLOYMENT)
    class AttentionShardDeployment:
        """One Serve replica = one attention shard. Serve autoscales the replicas (min..max) on their ongoing
        requests; on scale-in Serve stops routing to the replica, waits for its requests up to the graceful
        shutdown timeout, then ``__del__`` hands what is left back to the callers and leaves the group."""

        def __init__(self, config: dict, coordinator_name: str, options: dict):
            self.server = AttentionServer(config, coordinator_name, **options)

        async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                           output_token_ids: list[int] | None = None, num_output_chars: int = 0, consumer=None,
                           ticket: Ticket | None = None):
            async for out in self.server.generate(request_id, prompt_token_ids, params, output_token_ids,
                                                  num_output_chars, consumer, ticket):
                yield out

        async def stats(self) -> dict:
            return self.server.stats()

        def record_routing_stats(self) -> dict:
            """What the ingress's ``ShardRouter`` weighs besides the queue length: the free latent cache."""
            cache = self.server.shard.cache
            return {key: cache[key] for key in ("num_blocks", "num_free_blocks", "num_running", "num_waiting")
                    if key in cache}

        def check_health(self) -> None:
            self.server.check_health()

        def __del__(self):
            server = getattr(self, "server", None)
            if server is not None and not server._closed:
                server.leave(grace_s=0.0)

    return AttentionShardDeployment


AttentionShardDeployment = _deployment()
