"""``latentmoe loadtest`` against the real Serve application on a multi-node Ray cluster (head, one
attention node, one expert node), over HTTP and over gRPC, through the command line."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import pytest
import ray
import typer
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.config import gRPCOptions
from typer.testing import CliRunner

from latentmoe.actors.cluster import ROUTER_NAMESPACE, stop_coordinator
from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_node
from latentmoe.actors.serve_app import GRPC_SERVICERS, build_app
from latentmoe.cluster.communicator import free_port
from latentmoe.loadtest.cli import loadtest
from latentmoe.loadtest.clients import fetch_expert_load
from tests.prometheus import metric, scrape, settled_scrape

NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 8, 16, 8


@pytest.fixture(scope="module")
def server(tiny_dir):
    metrics_ports = [free_port() for _ in range(3)]
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "metrics_export_port": metrics_ports[0],
        "_system_config": {"metrics_report_interval_ms": 1000}})
    c.add_node(num_cpus=1, **role_node(ATTENTION_RESOURCE, 1), metrics_export_port=metrics_ports[1])
    c.add_node(num_cpus=1, **role_node(EXPERT_RESOURCE, 1), metrics_export_port=metrics_ports[2])
    ray.init(address=c.address, log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
        serve.run(build_app({"model": str(tiny_dir), "served_model_name": "tiny", "attention_shards": 1,
                             "expert_shards": 1, "engine": {"block_size": 16, "num_blocks": 128},
                             "max_num_requests": 8, "max_ongoing_requests": 16, "max_queued_requests": 16,
                             "min_replicas": 1, "max_replicas": 1}),
                  name="latentmoe", route_prefix="/")
        yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}",
               "metrics": [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports]}
    finally:
        serve.shutdown()
        stop_coordinator()
        ray.shutdown()
        c.shutdown()


def run_cli(*args) -> str:
    app = typer.Typer()
    app.command()(loadtest)
    out = CliRunner().invoke(app, [*map(str, args), "--no-progress"])
    assert out.exit_code == 0, out.output
    return out.output


def wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        cache = httpx.get(server["http"] + "/v1/cache", timeout=10).json()
        if cache["num_free_blocks"] == cache["num_blocks"] and cache["num_running"] == cache["num_waiting"] == 0:
            return cache
        time.sleep(0.2)
    raise AssertionError(f"cache not idle after {timeout} s: {cache}")


def settle(server):
    """No request in flight, and the last run's expert load out of the next run's window (whole seconds)."""
    wait_idle(server)
    time.sleep(1.5)


def check_result(out_dir, output_lens, model, input_len=INPUT_LEN, stream=True) -> dict:
    result = json.loads((out_dir / "result.json").read_text())
    s = result["summary"]
    assert s["num_requests"] == s["num_completed"] == len(output_lens), s
    assert s["num_errors"] == 0 and s["errors"] == {} and s["error_rate"] == 0
    requests = result["requests"]
    assert [r["index"] for r in requests] == list(range(len(output_lens)))
    assert [r["num_output_tokens"] for r in requests] == output_lens  # ignore_eos: as many tokens as asked
    assert all(r["finish_reason"] == "length" and r["ok"] for r in requests)
    if input_len is not None:
        assert all(r["num_input_tokens"] == input_len for r in requests)
    assert s["total_output_tokens"] == sum(output_lens) and s["num_short_outputs"] == 0
    for r in requests:
        assert r["e2e"] > 0
        if stream:
            assert 0 < r["ttft"] <= r["e2e"] and r["num_chunks"] >= 1
        else:
            assert r["ttft"] is None
    if stream:
        assert s["ttft_ms"]["count"] == len(output_lens) and s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
        assert s["itl_ms"]["count"] == sum(n - 1 for n in output_lens)  # one sample per token after the first
    assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
    for name in result["files"]:
        assert (out_dir / name).stat().st_size > 0
    assert {"result.json", "ttft.png", "itl.png", "e2e.png", "throughput.png", "report.html"} <= set(result["files"])
    load = result["expert_load"]
    assert load["available"], load  # latentmoe's own server serves GET /v1/expert-load and GetExpertLoad
    e, data = load["summary"], load["data"]
    assert e["imbalance_per_layer"] and e["hottest_experts"] and e["mean_devices_per_token"] >= 1
    assert {"expert_load.png", "shard_load.png"} <= set(result["files"])
    # the server routed what the load test says it sent: every prompt token and every output token but
    # the last of each request (it is never fed back) goes through each MoE layer to top_k experts
    top_k = model["num_experts_per_tok"]
    moe_layers = [str(i) for i in range(model["first_k_dense_replace"], model["num_hidden_layers"])]
    routed = s["total_input_tokens"] + s["total_output_tokens"] - s["num_completed"]
    assert sorted(data["tokens_per_expert"]) == moe_layers
    for layer, counts in data["tokens_per_expert"].items():
        assert sum(counts) == top_k * routed, (layer, sum(counts), top_k, routed)
    assert sum(data["devices_histogram"]) == routed * len(moe_layers)
    # one expert shard: each of those goes to it once, as a float32 hidden state with its top_k slot ids and
    # weights (float32), and comes back once as a float32 partial sum; the server's all-to-all counters say so,
    # with the padded blocks of decode passes on top
    row_bytes = model["hidden_size"] * 4 + 2 * top_k * 4 + model["hidden_size"] * 4
    assert e["ideal_bytes"] == routed * len(moe_layers) * row_bytes, (e, routed)
    assert e["a2a_bytes"] == e["ideal_bytes"] + e["a2a_padding_bytes"], e
    return result


@pytest.fixture(scope="module")
def model(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def test_http_completions_closed_loop(server, model, tmp_path):
    settle(server)
    before = settled_scrape(server["metrics"])
    output = run_cli("--url", server["http"], "--concurrency", 4, "--num-requests", NUM_REQUESTS,
                     "--input-len", INPUT_LEN, "--output-len", OUTPUT_LEN, "--out", tmp_path)
    assert "Mean TTFT (ms):" in output and "P99 ITL (ms):" in output and "Expert load" in output
    result = check_result(tmp_path, [OUTPUT_LEN] * NUM_REQUESTS, model)
    assert result["config"]["target"]["model"] == "tiny"  # the first of GET /v1/models
    assert max(result["timeseries"]["in_flight"]) <= 4
    # the load test's request and token counts agree with the server's own Prometheus metrics
    summary = result["summary"]
    deadline = time.time() + 30
    while True:  # Ray exports metrics about once a second
        after = scrape(server["metrics"])
        finished = metric(after, "ray_latentmoe_requests_total", status="length") - metric(
            before, "ray_latentmoe_requests_total", status="length")
        if finished >= NUM_REQUESTS or time.time() > deadline:
            break
        time.sleep(1)
    assert finished == summary["num_completed"] == NUM_REQUESTS
    for name, key in (("ray_latentmoe_generation_tokens_total", "total_output_tokens"),
                      ("ray_latentmoe_prompt_tokens_total", "total_input_tokens")):
        assert metric(after, name) - metric(before, name) == summary[key] > 0, name


def test_grpc_open_loop(server, model, tmp_path):
    """No --http-url: the server's default model, and the expert load by gRPC GetExpertLoad."""
    settle(server)
    run_cli("--grpc", server["grpc"], "--request-rate", 20, "--max-concurrency", 4, "--num-requests",
            NUM_REQUESTS, "--input-len", INPUT_LEN, "--output-len", OUTPUT_LEN, "--out", tmp_path)
    result = check_result(tmp_path, [OUTPUT_LEN] * NUM_REQUESTS, model)
    starts = [r["start"] for r in result["requests"]]
    assert starts == sorted(starts) and result["config"]["target"]["model"] is None


def test_http_chat_prompts_file_without_stream(server, model, tmp_path):
    settle(server)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Which experts are hot?", "max_tokens": 5}\n{"prompt": "Hello"}\n')
    run_cli("--url", server["http"], "--endpoint", "chat", "--no-stream", "--prompts-file", prompts,
            "--concurrency", 2, "--num-requests", 4, "--output-len", 3, "--out", tmp_path / "out")
    check_result(tmp_path / "out", [5, 3, 5, 3], model, input_len=None, stream=False)


def test_expert_load_absent_or_unreachable(server):
    absent = asyncio.run(fetch_expert_load(server["http"] + "/no-such-app", 5))  # Serve answers 404
    assert not absent["available"] and "404" in absent["reason"]
    down = asyncio.run(fetch_expert_load(f"http://127.0.0.1:{free_port()}", 5, timeout_s=5))
    assert not down["available"] and "did not answer" in down["reason"]
