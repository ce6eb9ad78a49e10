"""Capacity that follows load, for real: the Serve application on a Ray cluster whose autoscaler is Ray's own
(its fake multi-node provider starts and stops real raylets on this machine).

Attention nodes: min 1, max 2; expert nodes of one shard each: min 1, max 2. A burst of requests makes Serve
add a second attention shard, which asks for a second attention node, which Ray's autoscaler launches; the new
shard joins the collective group at a step boundary. After the burst Serve removes a shard (it drains and leaves
the group) while a stream is in flight, and Ray removes the idle node. A second expert shard, asked for under
load, brings a second expert node the same way, and goes with it. Every reply equals the reply its prompt gets
alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx2 as httpx
import pytest
import ray
from ray import serve

from latentmoe import LLM, SamplingParams
from latentmoe.actors.cluster import ROUTER_NAMESPACE
from latentmoe.actors.names import COORDINATOR_NAME
from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_labels
from latentmoe.actors.serve_app import build_app
from tests.actors.autoscaling import serving_cluster

IDLE_TIMEOUT_MINUTES = 0.25  # an idle attention node goes after 15 s
# one shard per attention node; a CPU to spare on each node for what Serve places anywhere (an ingress replica)
NODE_TYPES = {
    "attention": {"resources": {"CPU": 2, ATTENTION_RESOURCE: 1}, "labels": role_labels(ATTENTION_RESOURCE),
                  "min_workers": 1, "max_workers": 2},
    "expert": {"resources": {"CPU": 2, EXPERT_RESOURCE: 1}, "labels": role_labels(EXPERT_RESOURCE),
               "min_workers": 1, "max_workers": 2},
}
APP_ARGS = {"served_model_name": "tiny", "attention_shards": "1:2", "expert_shards": 1, "place_by_role": True,
            "target_shard_requests": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 8.0, "drain_timeout_s": 60.0,
            "engine": {"block_size": 16, "num_blocks": 256}, "max_num_requests": 32, "min_replicas": 1,
            "max_replicas": 1, "step_timeout_s": 30.0, "api_key": None, "api_key_env": None}


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def server(tiny_dir):
    with serving_cluster(NODE_TYPES, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES) as (c, http):
        serve.run(build_app({"model": str(tiny_dir), **APP_ARGS}), name="latentmoe", route_prefix="/")
        yield {"http": http, "cluster": c}


def health(server) -> dict:
    r = httpx.get(server["http"] + "/health", timeout=30)
    return r.json() if r.status_code == 200 else {}


def stream(server, prompt, max_tokens: int, started: threading.Event | None = None):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = ""
    with httpx.stream("POST", server["http"] + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                if started is not None:
                    started.set()
            elif line == "data: [DONE]":
                return text
    raise AssertionError("the stream ended without [DONE]")


def stream_until(server, done: threading.Event, spans: list, prompt, max_tokens: int, want: str,
                 started: threading.Event | None = None) -> None:
    """Stream ``prompt`` one time after another, each reply equal to ``want``, until ``done`` is set; appends each
    stream's (start, end) to ``spans`` (so that a stream is in flight whenever a change comes)."""
    while not done.is_set():
        begin = time.monotonic()
        assert stream(server, prompt, max_tokens, started) == want
        spans.append((begin, time.monotonic()))


def in_flight(spans: list, at: float) -> int:
    """The streams of ``spans`` running at ``at``."""
    return sum(begin < at < end for begin, end in spans)


def tokens_run_per_shard() -> dict[str, int]:
    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=ROUTER_NAMESPACE)
    shards = ray.get(coordinator.shards.remote(), timeout=30)["attention"]
    return {info["node_id"]: info.get("cache", {}).get("num_tokens_run", 0) for _, info in shards}


def test_a_burst_adds_a_shard_and_a_node_and_both_go_after_it(server, tiny_dir):
    c = server["cluster"]
    reference = LLM(model=str(tiny_dir))
    prompts = [[7 + i, 8, 9, 10 + i] for i in range(8)]
    expected = [o.text for o in reference.generate(prompts, SamplingParams(max_tokens=160, temperature=0.0,
                                                                           ignore_eos=True))]
    assert health(server)["attention_shards"] == 1
    epoch = health(server)["epoch"]

    # the burst: 8 streams against a target of 2 ongoing requests per shard, each stream followed by another until
    # the second shard is in the group (in CI a burst of single streams ended before a new node could be up, and
    # no shard came)
    start = time.monotonic()
    scaled = threading.Event()
    spans = []  # (start, end) of every stream

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        # every reply equal to its prompt's alone: the group re-formed under the streams and nothing changed
        workers = [pool.submit(stream_until, server, scaled, spans, p, 160, want) for p, want in zip(prompts, expected)]
        try:
            scale_out_s = wait_for(lambda: health(server).get("attention_shards") == 2, 240,
                                   "a second attention shard")
        finally:
            scaled_at = time.monotonic()
            scaled.set()
        for worker in workers:
            worker.result(timeout=300)
    assert in_flight(spans, scaled_at) > 0, "no stream in flight when the shard joined"
    assert len(c.alive_nodes(ATTENTION_RESOURCE)) == 2  # Ray's autoscaler launched the node for the new shard
    after = health(server)
    assert after["epoch"] > epoch and after["scale_outs"] >= 1
    print(f"\nscale-out: load to a second shard in the group {scale_out_s:.1f} s "
          f"(burst started {time.monotonic() - start:.1f} s ago)")

    # the new shard serves: a second wave spreads over both
    before = tokens_run_per_shard()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        wave = list(pool.map(lambda p: stream(server, p, 160), prompts))
    assert wave == expected
    ran = {node: n - before.get(node, 0) for node, n in tokens_run_per_shard().items()}
    # the shard router asks a shard it has not heard from yet, then takes the least loaded: about half each (Serve's
    # default router sent all 8 to the old shard now and then: the new one had no cached queue length)
    assert len(ran) == 2 and all(n >= sum(ran.values()) / 4 for n in ran.values()), ran
    print(f"the second wave's tokens per shard: {sorted(ran.values())}")

    # after the burst: a stream in flight while Serve takes a shard away; it completes unchanged
    long_prompt = [11, 12, 13]
    long_expected = reference.generate([long_prompt], SamplingParams(max_tokens=600, temperature=0.0,
                                                                     ignore_eos=True))[0].text
    started, scaled_in = threading.Event(), threading.Event()
    spans = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        worker = pool.submit(stream_until, server, scaled_in, spans, long_prompt, 600, long_expected, started)
        assert started.wait(60)
        try:
            scale_in_s = wait_for(lambda: health(server).get("attention_shards") == 1, 180, "the scale-in")
        finally:
            scaled_in_at = time.monotonic()
            scaled_in.set()
        worker.result(timeout=300)
    assert in_flight(spans, scaled_in_at) == 1, "no stream in flight at the scale-in"
    assert health(server)["scale_ins"] >= 1
    node_gone_s = wait_for(lambda: len(c.alive_nodes(ATTENTION_RESOURCE)) == 1, 180, "the idle node's removal")
    print(f"scale-in: one shard left {scale_in_s:.1f} s after the stream started; "
          f"its node removed {node_gone_s:.1f} s later")
    r = httpx.post(server["http"] + "/v1/completions", timeout=120,
                   json={"model": "tiny", "prompt": prompts[0], "max_tokens": 160, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[0]


def test_a_second_expert_shard_brings_its_node_and_both_go_after_it(server, tiny_dir):
    """`scale_experts(2)`: the new shard's resource request makes Ray's autoscaler launch a second expert node, the
    shard starts there with its slice, then one switch, with streams in flight (started once the node is up);
    every reply unchanged. Back to 1 under streams: the shard stops and Ray removes its idle node. The streams go on
    one after another until each change is over (a shard's start took 10 s in one run: streams started once the
    node was up had all ended by then)."""
    c = server["cluster"]
    reference = LLM(model=str(tiny_dir))
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(4)]
    expected = [o.text for o in reference.generate(prompts, SamplingParams(max_tokens=600, temperature=0.0,
                                                                           ignore_eos=True))]
    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=ROUTER_NAMESPACE)
    for num_expert in (2, 1):
        before = health(server)
        if num_expert == 2:  # Ray's autoscaler launches the node for the new shard; the streams start then
            change = coordinator.scale_experts.remote(num_expert)
            node_s = wait_for(lambda: len(c.alive_nodes(EXPERT_RESOURCE)) == 2, 240, "a second expert node")
        started, changed = threading.Event(), threading.Event()
        spans = []  # (start, end) of every stream

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            workers = [pool.submit(stream_until, server, changed, spans, p, 600, want, started)
                       for p, want in zip(prompts, expected)]
            assert started.wait(60)
            if num_expert == 1:
                change = coordinator.scale_experts.remote(num_expert)
            report = ray.get(change, timeout=400)
            changed_at = time.monotonic()
            changed.set()
            for worker in workers:
                worker.result(timeout=300)  # every stream's reply equal to its prompt's alone
        # the streams that were running when the change returned (its switch is its last step)
        running = in_flight(spans, changed_at)
        print(f"\n{report['expert_shards_before']} -> {num_expert} expert shards ({len(spans)} streams, {running} "
              f"running when it returned): {report}")
        after = health(server)
        assert report["changed"] and after["expert_shards"] == num_expert, report
        # no fault on the way (Serve may add an attention shard for the streams meanwhile: another epoch)
        assert report["epoch"] > before["epoch"] and after["recoveries"] == before["recoveries"], (before, after)
        assert running > 0
        if num_expert == 2:
            print(f"the second expert node was up {node_s:.1f} s after the call")
        else:
            wait_for(lambda: len(c.alive_nodes(EXPERT_RESOURCE)) == 1, 180, "the idle expert node's removal")
            print(f"its idle node removed within {time.monotonic() - changed_at:.1f} s of the change")
