"""The ingress's HTTP and gRPC layers without Ray: the Serve deployment's class built on an injected engine
client over the single-process engine, its handlers called as Serve would call them. Expected outputs come
from ``LLM.generate`` on the same checkpoint."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from latentmoe import LLM, SamplingParams
from latentmoe.actors.engine_client import InProcessClient
from latentmoe.actors.serve_app import LatentMoEServer
from latentmoe.engine.async_engine import AsyncLLM
from latentmoe.engine.engine import LLMEngine
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.proto.convert import request_to_proto

Ingress = LatentMoEServer.func_or_class.__mro__[1]  # the class itself, under Serve's ASGI wrapper


@pytest.fixture(scope="module")
def ingress(tiny_dir):
    engine = AsyncLLM(LLMEngine(EngineConfig(model=str(tiny_dir), num_blocks=64, block_size=16)))
    server = Ingress({"model": str(tiny_dir), "served_model_name": "tiny", "api_key": None, "api_key_env": None},
                     engine=InProcessClient(engine))
    yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return LLM(model=str(tiny_dir))


def http_request(path: str, body: dict | bytes, headers: dict | None = None):
    """A Starlette request as the proxy hands it to the replica."""
    from starlette.requests import Request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    raw = [(b"content-type", b"application/json")] + [(k.lower().encode(), v.encode())
                                                      for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""}, receive)


async def body_of(response) -> tuple[int, bytes]:
    """(status, body) of what a handler returned (a plain dict is FastAPI's 200 JSON)."""
    if isinstance(response, dict):
        return 200, json.dumps(response).encode()
    if hasattr(response, "body_iterator"):
        chunks = [c if isinstance(c, bytes) else c.encode() async for c in response.body_iterator]
        return response.status_code, b"".join(chunks)
    return response.status_code, response.body


class GrpcContext:
    def __init__(self, metadata=()):
        self.metadata, self.code, self.details = metadata, None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_completions_and_stream_match_llm_generate(ingress, reference):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    expected = reference.generate(["The experts of a mixture"], params)[0]
    body = {"model": "tiny", "prompt": "The experts of a mixture", "max_tokens": 12, "temperature": 0}

    async def run():
        status, raw = await body_of(await ingress.completions(http_request("/v1/completions", body)))
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["text"] == expected.text
        status, raw = await body_of(await ingress.completions(http_request("/v1/completions",
                                                                           body | {"stream": True})))
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected.text

    asyncio.run(run())


def test_bad_input_is_400_naming_the_field(ingress):
    async def run():
        for body, field in (({"model": "tiny", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
                            ({"model": "tiny", "prompt": [5, 10 ** 7]}, "prompt"),
                            (b"{not json", None)):
            status, raw = await body_of(await ingress.completions(http_request("/v1/completions", body)))
            error = json.loads(raw)["error"]
            assert status == 400 and error["type"] == "invalid_request_error", raw
            if field:
                assert field in error["message"] or error.get("param") == field, error
        status, raw = await body_of(await ingress.completions(http_request("/v1/completions",
                                                                           {"model": "other", "prompt": "hi"})))
        assert status == 404

    asyncio.run(run())


def test_health_and_grpc_generate(ingress, reference):
    params = SamplingParams(max_tokens=6, temperature=0.0)
    expected = reference.generate([[5, 6, 7]], params)[0]

    async def run():
        health = await ingress.health()
        assert health["status"] == "ok" and health["attention_shards"] == 1
        context = GrpcContext()
        reply = await ingress.Generate(request_to_proto([5, 6, 7], params), context)
        assert context.code is None and list(reply.token_ids) == expected.token_ids
        context = GrpcContext()
        with pytest.raises(ValueError):
            await ingress.Generate(request_to_proto([5, 10 ** 7], params), context)
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in context.details

    asyncio.run(run())
