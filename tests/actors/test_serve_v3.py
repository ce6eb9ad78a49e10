"""``latentmoe serve`` and ``latentmoe loadtest`` on a DeepSeek-V3-architecture checkpoint in DeepSeek's FP8,
for real: the server in a sandbox of its own, the official `openai` client, grpcio and the load test's command
line. Expected outputs come from the single-process engine (`LLM.generate`) on the same checkpoint; the expert
load the server reports has the checkpoint's MoE layers and experts, and no token reaches more expert shards than
its topk_group groups live on.
"""

from __future__ import annotations

import json
import subprocess
import time

import grpc
import httpx2 as httpx
import openai
import pytest

from latentmoe import LLM, SamplingParams
from latentmoe.model.tiny import TINY_V3_CONFIG, make_tiny
from latentmoe.proto import generate_pb2_grpc
from latentmoe.proto.convert import request_to_proto
from tests.actors.sandbox import BIN, PROMPT, sandbox, serving

EXPERT_SHARDS = 4  # one group of 4 experts on each: topk_group = 2 of them bounds the devices a token reaches
NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 6, 12, 6
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which experts are hot?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("v3") / "tiny-v3-fp8", seed=3, config=TINY_V3_CONFIG,
                     fp8_block_size=(128, 128))


@pytest.fixture(scope="module")
def config(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def reference(checkpoint):
    return LLM(model=str(checkpoint))


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    with serving(sandbox(tmp_path_factory.mktemp("serve-v3")), checkpoint, "--expert-shards", str(EXPERT_SHARDS),
                 "--max-replicas", "1", "--no-ray-dashboard") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion_matches_llm_generate(server, client, reference, config):
    assert config["model_type"] == "deepseek_v3" and config["quantization_config"]["quant_method"] == "fp8"
    expected = reference.generate(PROMPT, GREEDY)[0]
    out = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.completion_tokens == len(expected.token_ids)


def test_streamed_chat_matches_llm_generate(server, client, reference):
    expected = reference.generate(reference.tokenizer.apply_chat_template(MESSAGES), GREEDY)[0]
    chunks = list(client.chat.completions.create(model=server.model_name, messages=MESSAGES, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason


def test_grpc_generate_matches_llm_generate(server, reference):
    expected = reference.generate("Hello experts", GREEDY)[0]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        out = generate_pb2_grpc.GeneratorStub(channel).Generate(request_to_proto("Hello experts", GREEDY), timeout=60)
    assert list(out.token_ids) == expected.token_ids and out.text == expected.text
    assert out.finished and out.finish_reason == expected.finish_reason


def settle(server, timeout=30):
    """Nothing in flight, and the earlier requests' expert load (folded in about once a second) out of the next
    run's window (whole seconds from its start)."""
    deadline = time.time() + timeout
    while (cache := httpx.get(server.url + "/v1/cache", timeout=10).json())["num_free_blocks"] != cache["num_blocks"]:
        assert time.time() < deadline, f"cache not idle after {timeout} s: {cache}"
        time.sleep(0.2)
    time.sleep(3)


def check_load(data, config, routed, exact=True):
    """A ``GET /v1/expert-load`` body: the checkpoint's MoE layers and experts, each routed token at top_k experts
    of each layer, on at most topk_group expert shards (``routed`` of them, or at least as many)."""
    moe_layers = [str(i) for i in range(config["first_k_dense_replace"], config["num_hidden_layers"])]
    assert sorted(data["tokens_per_expert"]) == moe_layers and data["num_experts"] == config["n_routed_experts"]
    for layer, counts in data["tokens_per_expert"].items():
        assert len(counts) == config["n_routed_experts"], (layer, counts)
        num_routed = sum(counts) // config["num_experts_per_tok"]
        assert sum(counts) % config["num_experts_per_tok"] == 0, (layer, counts)
        assert num_routed == routed if exact else num_routed >= routed, (layer, num_routed, routed)
    histogram = data["devices_histogram"]
    assert sum(histogram) == num_routed * len(moe_layers) and histogram[0] == 0, histogram
    assert all(n == 0 for n in histogram[config["topk_group"] + 1:]), (histogram, config["topk_group"])
    assert histogram[config["topk_group"]] > 0, histogram  # the bound is reached: tokens do span two groups
    assert data["max_devices_per_token"] == min(EXPERT_SHARDS, config["topk_group"])
    assert len(data["experts_per_shard"]) == data["num_shards"] == EXPERT_SHARDS


def test_loadtest_and_expert_load(server, config, tmp_path):
    settle(server)
    out = subprocess.run(
        [str(BIN / "latentmoe"), "loadtest", "--url", server.url, "--concurrency", "3", "--num-requests",
         str(NUM_REQUESTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
         "--vocab-size", str(config["vocab_size"]), "--out", str(tmp_path), "--no-progress"],
        env=server.env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    s = result["summary"]
    assert s["num_requests"] == s["num_completed"] == NUM_REQUESTS, s
    assert s["num_errors"] == 0 and s["errors"] == {} and s["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
    assert result["config"]["target"]["model"] == server.model_name
    # every prompt token and every output token but the last of each request goes through each MoE layer
    routed = s["total_input_tokens"] + s["total_output_tokens"] - s["num_completed"]
    load = result["expert_load"]
    assert load["available"], load
    check_load(load["data"], config, routed)
    summary = load["summary"]
    assert summary["num_experts"] == config["n_routed_experts"]
    assert sorted(summary["imbalance_per_layer"]) == sorted(load["data"]["tokens_per_expert"])
    assert 1 <= summary["mean_devices_per_token"] <= config["topk_group"]
    assert len(summary["devices_histogram"]) <= config["num_experts_per_tok"] + 1
    # the server's own endpoint says the same, over a window that holds the run (and maybe the requests before)
    live = httpx.get(server.url + "/v1/expert-load", params={"window_s": 600}, timeout=30)
    assert live.status_code == 200, live.text
    check_load(live.json(), config, routed, exact=False)
