"""The schedule with a stand-in ``send`` (no network): how many requests, how many in flight, when."""

from __future__ import annotations

import asyncio

import pytest

from latentmoe.loadtest.clients import http_body, make_clock
from latentmoe.loadtest.metrics import RequestResult
from latentmoe.loadtest.runner import Schedule, Target, run_schedule
from latentmoe.loadtest.workload import LengthDist, Workload

WORKLOAD = Workload(LengthDist(4), LengthDist(2))


class FakeServer:
    """Answers each request after ``latency`` seconds and records how many were in flight at once."""

    def __init__(self, latency: float, clock):
        self.latency, self.clock = latency, clock
        self.in_flight = self.max_in_flight = 0

    async def send(self, spec):
        start = self.clock()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.latency)
        self.in_flight -= 1
        return RequestResult(spec.index, start, self.clock(), [self.clock()], None, 4, 2, spec.max_tokens)


def run(schedule, latency=0.02):
    clock = make_clock()
    server = FakeServer(latency, clock)
    seen = []
    results = asyncio.run(run_schedule(server.send, WORKLOAD, schedule, clock, seen.append))
    return results, server, seen


def test_closed_loop_keeps_concurrency_in_flight():
    results, server, seen = run(Schedule(concurrency=3, num_requests=10))
    assert [r.index for r in results] == list(range(10)) and len(seen) == 10
    assert server.max_in_flight == 3


def test_open_loop_respects_max_concurrency():
    results, server, _ = run(Schedule(request_rate=float("inf"), max_concurrency=2, num_requests=7))
    assert [r.index for r in results] == list(range(7)) and server.max_in_flight == 2
    results, server, _ = run(Schedule(request_rate=float("inf"), num_requests=7))
    assert server.max_in_flight == 7  # no limit: everything at once


def test_open_loop_sends_at_poisson_times():
    results, _, _ = run(Schedule(request_rate=100.0, num_requests=30, seed=3), latency=0.001)
    starts = [r.start for r in results]
    assert starts == sorted(starts) and starts[0] < 0.05
    assert 0.1 < starts[-1] < 1.5  # 29 gaps of mean 10 ms


def test_duration_stops_sending_and_waits_for_the_rest():
    results, _, _ = run(Schedule(concurrency=2, duration_s=0.2), latency=0.05)
    assert 4 <= len(results) <= 12 and max(r.start for r in results) < 0.2
    assert max(r.end for r in results) < 0.2 + 0.05 + 0.1
    both, _, _ = run(Schedule(concurrency=2, num_requests=3, duration_s=10.0))  # whichever comes first
    assert len(both) == 3
    rate, _, _ = run(Schedule(request_rate=50.0, duration_s=0.3, seed=1), latency=0.01)
    assert 3 <= len(rate) <= 40 and max(r.start for r in rate) < 0.3


@pytest.mark.parametrize("kwargs,message", [
    ({"num_requests": 1}, "either a concurrency"), ({"concurrency": 1, "request_rate": 1.0, "num_requests": 1},
                                                    "either a concurrency"),
    ({"concurrency": 0, "num_requests": 1}, "concurrency must be >= 1"),
    ({"request_rate": -1.0, "num_requests": 1}, "rate must be > 0"),
    ({"concurrency": 2, "max_concurrency": 2, "num_requests": 1}, "max concurrency"),
    ({"concurrency": 2}, "number of requests, a duration"), ({"concurrency": 2, "num_requests": 0}, ">= 1"),
    ({"concurrency": 2, "duration_s": 0.0}, "duration must be > 0"),
])
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_targets():
    with pytest.raises(ValueError, match="either --url"):
        Target()
    with pytest.raises(ValueError, match="either --url"):
        Target(url="http://x", grpc="x:1")
    with pytest.raises(ValueError, match="no chat endpoint"):
        Target(grpc="x:1", endpoint="chat")
    with pytest.raises(ValueError, match="'completions' or 'chat'"):
        Target(url="http://x", endpoint="embeddings")
    assert Target(grpc="x:1", http_url="http://y").info_url == "http://y"


def test_http_bodies():
    spec = WORKLOAD.request(0)
    body = http_body(spec, "tiny", chat=False, stream=True, ignore_eos=True, temperature=1.0)
    assert body == {"model": "tiny", "prompt": spec.prompt, "max_tokens": 2, "temperature": 1.0,
                    "seed": spec.seed, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
    text = Workload(LengthDist(3), LengthDist(2), text=True).request(0)
    chat = http_body(text, "tiny", chat=True, stream=False, ignore_eos=False, temperature=0.0)
    assert chat["messages"] == [{"role": "user", "content": text.prompt}] and "stream_options" not in chat
    with pytest.raises(ValueError, match="text prompts"):
        http_body(spec, "tiny", chat=True, stream=True, ignore_eos=True, temperature=1.0)


def test_expert_load_from_grpc_has_the_json_shape():
    from latentmoe.loadtest.clients import expert_load_from_proto
    from latentmoe.proto import generate_pb2 as pb

    msg = pb.ExpertLoadResponse(
        window_s=30, layers=[pb.LayerLoad(layer=1, tokens_per_expert=[10, 20, 30, 60], imbalance=2.0),
                             pb.LayerLoad(layer=2, tokens_per_expert=[30, 30, 30, 30], imbalance=1.0)],
        tokens_per_shard=[90, 150], shard_imbalance=1.25, devices_histogram=[0, 80, 40], a2a_bytes=300,
        ideal_bytes=200)
    d = expert_load_from_proto(msg)
    assert d["tokens_per_expert"] == {"1": [10, 20, 30, 60], "2": [30, 30, 30, 30]}
    assert d["imbalance_per_layer"] == {"1": 2.0, "2": 1.0} and d["num_tokens"] == 120
    assert (d["num_experts"], d["num_shards"], d["layers"]) == (4, 2, [1, 2])
    assert d["hottest_experts"][:2] == [{"layer": 1, "expert": 3, "tokens": 60},
                                        {"layer": 2, "expert": 3, "tokens": 30}]
    assert (d["window_s"], d["tokens_per_shard"], d["shard_imbalance"], d["devices_histogram"]) == (
        30, [90, 150], 1.25, [0, 80, 40])
    assert (d["a2a_bytes"], d["ideal_bytes"]) == (300, 200)
