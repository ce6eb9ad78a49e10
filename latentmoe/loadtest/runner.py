"""A load test end to end: the schedule that decides when requests go out, and ``run_loadtest``.

``run_schedule`` knows nothing of the wire: it calls ``send(spec)`` for the workload's requests, either
from ``concurrency`` workers that each send the next request when their last one ends (closed loop), or
at Poisson arrival times of ``request_rate`` per second, at most ``max_concurrency`` in flight (open
loop). It stops sending after ``num_requests`` or ``duration_s``, whichever comes first, and waits for
the requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from latentmoe.loadtest import clients
from latentmoe.loadtest.metrics import RequestResult, summarize, summarize_expert_load, timeseries
from latentmoe.loadtest.workload import RequestSpec, Workload, arrival_times

Send = Callable[[RequestSpec], Awaitable[RequestResult]]


@dataclass(frozen=True)
class Schedule:
    concurrency: int | None = None  # closed loop: this many requests in flight
    request_rate: float | None = None  # open loop: Poisson arrivals, requests per second (inf: all at once)
    max_concurrency: int | None = None  # open loop: at most this many in flight (None: no limit)
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0  # of the arrival times

    def __post_init__(self):
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("give either a concurrency (closed loop) or a request rate (open loop), not "
                             f"both or neither: concurrency={self.concurrency}, request_rate={self.request_rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request rate must be > 0, got {self.request_rate}")
        if self.max_concurrency is not None and (self.concurrency is not None or self.max_concurrency < 1):
            raise ValueError(f"max concurrency applies to a request rate and must be >= 1, got {self.max_concurrency}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give a number of requests, a duration, or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"number of requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration_s}")


async def run_schedule(send: Send, workload: Workload, schedule: Schedule, clock: Callable[[], float],
                       on_result: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """Send the workload's requests 0, 1, 2, ... by the schedule; the results in index order."""
    results: list[RequestResult] = []
    limit = schedule.num_requests if schedule.num_requests is not None else math.inf
    deadline = schedule.duration_s if schedule.duration_s is not None else math.inf

    async def one(spec: RequestSpec) -> None:
        result = await send(spec)
        results.append(result)
        if on_result is not None:
            on_result(result)

    if schedule.concurrency is not None:
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < limit and clock() < deadline:
                index, next_index = next_index, next_index + 1
                await one(workload.request(index))

        await asyncio.gather(*(worker() for _ in range(schedule.concurrency)))
    else:
        slots = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else None

        async def gated(spec: RequestSpec) -> None:
            if slots is None:
                return await one(spec)
            async with slots:
                if clock() < deadline:  # a request that waited past the end is not sent
                    await one(spec)

        tasks = []
        for index, at in enumerate(arrival_times(schedule.request_rate, schedule.seed)):
            if index >= limit or at >= deadline:
                break
            delay = at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(gated(workload.request(index))))
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.index)


@dataclass(frozen=True)
class Target:
    """Where to send: ``url`` (HTTP base) or ``grpc`` (HOST:PORT); ``http_url`` is where to ask for the model
    list and expert load when testing gRPC (defaults to ``url``)."""

    url: str | None = None
    grpc: str | None = None
    http_url: str | None = None
    model: str | None = None
    endpoint: str = "completions"  # or "chat"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 1.0
    timeout_s: float = 600.0
    api_key: str | None = None  # sent as "Authorization: Bearer <key>" (HTTP) / "authorization" metadata (gRPC)

    def __post_init__(self):
        if (self.url is None) == (self.grpc is None):
            raise ValueError("give either --url (HTTP) or --grpc HOST:PORT")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.grpc is not None and self.endpoint != "completions":
            raise ValueError("gRPC has no chat endpoint: leave --endpoint at completions with --grpc")

    @property
    def info_url(self) -> str | None:
        return self.http_url or self.url


def config_dict(target: Target, schedule: Schedule, workload: Workload) -> dict:
    w = dataclasses.asdict(workload)
    w["prompts"] = None if workload.prompts is None else f"{len(workload.prompts)} prompts from a file"
    s = dataclasses.asdict(schedule)
    if s["request_rate"] == math.inf:  # JSON has no infinity
        s["request_rate"] = "inf"
    return {"target": dataclasses.asdict(target), "schedule": s, "workload": w}


async def run_loadtest(target: Target, schedule: Schedule, workload: Workload,
                       on_result: Callable[[RequestResult], None] | None = None, settle_s: float = 1.5,
                       ) -> tuple[dict, list[RequestResult]]:
    """Run the load test: its result (config, summary, per-request records, throughput over time and the
    expert load of the run, ``{"available": False, "reason"}`` where the server does not say) and the raw
    per-request results (chunk times included).

    The expert load is asked for ``settle_s`` after the last response (the server folds in its dispatch
    statistics about once a second), over a window from the start of the run, in whole seconds: over HTTP
    when there is an HTTP address, else by gRPC ``GetExpertLoad``."""
    model = target.model
    if model is None and target.info_url is not None:
        models = await clients.fetch_models(target.info_url, api_key=target.api_key)
        if not models:
            raise ValueError(f"{target.info_url}/v1/models lists no model")
        model = models[0]
    clock = clients.make_clock()
    started_at = time.time()  # wall time: the server's placement changes are stamped with it
    options = dict(stream=target.stream, ignore_eos=target.ignore_eos, temperature=target.temperature,
                   timeout_s=target.timeout_s, clock=clock, api_key=target.api_key)
    if target.url is not None:
        if model is None:
            raise ValueError("no model name: give --model")
        max_connections = schedule.concurrency or schedule.max_concurrency
        client = clients.HttpClient(target.url, model, chat=target.endpoint == "chat",
                                    max_connections=max_connections, **options)
    else:
        client = clients.GrpcClient(target.grpc, model, **options)
    async with client:
        results = await run_schedule(client.send, workload, schedule, clock, on_result)
        duration = max((r.end for r in results), default=clock())
        await asyncio.sleep(settle_s)
        window_s = math.ceil(clock())
        if target.info_url is not None:
            load = await clients.fetch_expert_load(target.info_url, window_s, api_key=target.api_key)
        else:
            load = await client.expert_load(window_s)
    if load["available"]:
        load["summary"] = summarize_expert_load(load["data"], since=started_at)
    config = config_dict(target, schedule, workload)
    config["target"]["model"] = model
    result = {"config": config, "summary": summarize(results, duration), "expert_load": load,
              "timeseries": timeseries(results, duration), "requests": [r.to_dict() for r in results]}
    return result, results
