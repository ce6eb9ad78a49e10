"""The network side of a load test: send one ``RequestSpec`` and time it, over HTTP or gRPC.

Each client's ``send(spec)`` returns a ``RequestResult`` and never raises for a failed request: the
status and message go into the result. ``clock()`` gives seconds since the start of the run.

HTTP (OpenAI API): a chunk counts when it carries content text (``choices[0].text`` on completions,
``choices[0].delta.content`` on chat); streams ask for ``include_usage`` and take the token counts from
the last chunk. gRPC (``latentmoe.v1.Generator``): a message counts when it carries token ids, and says
how many.
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator, Callable

import grpc
import httpx2 as httpx

from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.loadtest.metrics import RequestResult
from latentmoe.loadtest.workload import RequestSpec
from latentmoe.proto import generate_pb2, generate_pb2_grpc
from latentmoe.proto.convert import request_to_proto


def make_clock() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def http_body(spec: RequestSpec, model: str, chat: bool, stream: bool, ignore_eos: bool,
              temperature: float) -> dict:
    """The JSON body of one request to ``/v1/completions`` or ``/v1/chat/completions``."""
    body = {"model": model, "max_tokens": spec.max_tokens, "temperature": temperature, "seed": spec.seed,
            "ignore_eos": ignore_eos, "stream": stream}
    if chat:
        if not isinstance(spec.prompt, str):
            raise ValueError("the chat endpoint takes text prompts, not token ids (use --endpoint completions)")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def error_message(status: int, content: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the body's start."""
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content.decode("utf-8", "replace")[:200] or f"HTTP {status}"


class HttpClient:
    """Sends requests to an OpenAI-compatible server; ``async with`` it (one connection pool per run)."""

    def __init__(self, base_url: str, model: str, *, chat: bool = False, stream: bool = True,
                 ignore_eos: bool = True, temperature: float = 1.0, timeout_s: float = 600.0,
                 max_connections: int | None = None, clock: Callable[[], float] | None = None,
                 api_key: str | None = None):
        self.model, self.chat, self.stream = model, chat, stream
        self.ignore_eos, self.temperature = ignore_eos, temperature
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.clock = clock or make_clock()
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout_s), headers=auth_headers(api_key),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def __aenter__(self) -> "HttpClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    async def send(self, spec: RequestSpec) -> RequestResult:
        body = http_body(spec, self.model, self.chat, self.stream, self.ignore_eos, self.temperature)
        result = RequestResult(spec.index, self.clock(), max_tokens=spec.max_tokens)
        try:
            if self.stream:
                await self._stream(body, result)
            else:
                response = await self.client.post(self.path, json=body)
                result.end = self.clock()
                if response.status_code != 200:
                    result.status, result.error = str(response.status_code), error_message(
                        response.status_code, response.content)
                else:
                    self._take(response.json(), result)
        except Exception as e:  # the connection failed, timed out, or the body was not what the API says
            result.end = self.clock()
            result.status = "timeout" if isinstance(e, httpx.TimeoutException) else type(e).__name__
            result.error = str(e) or repr(e)
        return result

    async def _stream(self, body: dict, result: RequestResult) -> None:
        async with self.client.stream("POST", self.path, json=body) as response:
            if response.status_code != 200:
                content = await response.aread()
                result.end = self.clock()
                result.status, result.error = str(response.status_code), error_message(response.status_code, content)
                return
            done = False
            async for chunk in sse_chunks(response):
                if chunk is None:
                    done = True
                    break
                now = self.clock()
                if "error" in chunk:  # the server failed mid-stream and said so in the stream
                    result.status = "stream_error"
                    result.error = str((chunk["error"] or {}).get("message", chunk["error"]))
                    break
                for choice in chunk.get("choices") or []:
                    text = choice.get("delta", {}).get("content") if self.chat else choice.get("text")
                    if text:
                        result.chunk_times.append(now)
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if chunk.get("usage"):
                    self._usage(chunk["usage"], result)
            result.end = self.clock()
            if not done and result.error is None:
                result.status, result.error = "incomplete", "the stream ended before data: [DONE]"
        if result.ok and result.num_output_tokens is None:  # no usage chunk: one token per content chunk
            result.num_output_tokens = len(result.chunk_times)

    def _take(self, response: dict, result: RequestResult) -> None:
        result.finish_reason = response["choices"][0].get("finish_reason")
        self._usage(response["usage"], result)

    @staticmethod
    def _usage(usage: dict, result: RequestResult) -> None:
        result.num_input_tokens = usage.get("prompt_tokens")
        result.num_output_tokens = usage.get("completion_tokens")


class GrpcClient:
    """Sends requests to ``latentmoe.v1.Generator`` (``GenerateStream``, or ``Generate`` without streaming)."""

    def __init__(self, target: str, model: str | None = None, *, stream: bool = True, ignore_eos: bool = True,
                 temperature: float = 1.0, timeout_s: float = 600.0, clock: Callable[[], float] | None = None,
                 api_key: str | None = None):
        self.model, self.stream, self.ignore_eos, self.temperature = model, stream, ignore_eos, temperature
        self.timeout_s = timeout_s
        self.metadata = tuple(auth_headers(api_key).items())
        self.clock = clock or make_clock()
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = generate_pb2_grpc.GeneratorStub(self.channel)

    async def __aenter__(self) -> "GrpcClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    def request(self, spec: RequestSpec):
        params = SamplingParams(max_tokens=spec.max_tokens, temperature=self.temperature, seed=spec.seed,
                                ignore_eos=self.ignore_eos)
        return request_to_proto(spec.prompt, params, model=self.model)

    async def send(self, spec: RequestSpec) -> RequestResult:
        request = self.request(spec)
        result = RequestResult(spec.index, self.clock(), max_tokens=spec.max_tokens)
        result.chunk_tokens = [] if self.stream else None
        try:
            if self.stream:
                last = None
                async for last in self.stub.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata):
                    if last.token_ids:
                        result.chunk_times.append(self.clock())
                        result.chunk_tokens.append(len(last.token_ids))
                if last is None or not last.finished:
                    result.status, result.error = "incomplete", "the stream ended before a finished message"
            else:
                last = await self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
            result.end = self.clock()
            if last is not None and last.finished:
                result.finish_reason = last.finish_reason
                result.num_input_tokens = last.usage.prompt_tokens
                result.num_output_tokens = last.usage.completion_tokens
        except grpc.aio.AioRpcError as e:
            result.end = self.clock()
            result.status, result.error = e.code().name, e.details() or e.code().name
        except Exception as e:
            result.end = self.clock()
            result.status, result.error = type(e).__name__, str(e) or repr(e)
        return result


    async def expert_load(self, window_s: int) -> dict:
        """``GetExpertLoad`` in the shape of ``GET /v1/expert-load`` (see ``fetch_expert_load``)."""
        try:
            msg = await self.stub.GetExpertLoad(generate_pb2.ExpertLoadRequest(window_s=window_s), timeout=30,
                                                    metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            return {"available": False, "reason": f"GetExpertLoad failed: {e.code().name}: {e.details()}"}
        return {"available": True, "data": expert_load_from_proto(msg)}


def expert_load_from_proto(msg) -> dict:
    """An ``ExpertLoadResponse`` as the JSON of ``GET /v1/expert-load`` (totals and hottest experts derived)."""
    tokens_per_expert = {str(layer.layer): list(layer.tokens_per_expert) for layer in msg.layers}
    hottest = sorted(((n, layer.layer, e) for layer in msg.layers for e, n in enumerate(layer.tokens_per_expert)
                      if n), reverse=True)[:10]
    return {"window_s": msg.window_s, "layers": [layer.layer for layer in msg.layers],
            "num_experts": len(msg.layers[0].tokens_per_expert) if msg.layers else None,
            "num_shards": len(msg.tokens_per_shard), "num_tokens": sum(msg.devices_histogram),
            "tokens_per_expert": tokens_per_expert,
            "imbalance_per_layer": {str(layer.layer): layer.imbalance for layer in msg.layers},
            "tokens_per_shard": list(msg.tokens_per_shard), "shard_imbalance": msg.shard_imbalance,
            "devices_histogram": list(msg.devices_histogram),
            "hottest_experts": [{"layer": layer, "expert": e, "tokens": n} for n, layer, e in hottest],
            "a2a_bytes": msg.a2a_bytes, "ideal_bytes": msg.ideal_bytes, "a2a_padding_bytes": msg.a2a_padding_bytes}


async def sse_chunks(response) -> AsyncIterator[dict | None]:
    """The JSON objects of a streamed OpenAI response's ``data:`` lines, then ``None`` for ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header (HTTP) or metadata (gRPC, lower-case) that carries an API key; none without a key."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_models(base_url: str, timeout_s: float = 30.0, api_key: str | None = None) -> list[str]:
    """The model ids of ``GET /v1/models``."""
    async with httpx.AsyncClient(timeout=timeout_s, headers=auth_headers(api_key)) as client:
        response = await client.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]


async def fetch_expert_load(base_url: str, window_s: int, timeout_s: float = 30.0, api_key: str | None = None) -> dict:
    """``GET /v1/expert-load?window_s=N`` as ``{"available": True, "data": {...}}``, or
    ``{"available": False, "reason": ...}`` when there is no such endpoint or no answer."""
    url = base_url.rstrip("/") + "/v1/expert-load"
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers=auth_headers(api_key)) as client:
            response = await client.get(url, params={"window_s": window_s})
    except Exception as e:
        return {"available": False, "reason": f"{url} did not answer: {type(e).__name__}: {e}"}
    if response.status_code == 404:
        return {"available": False, "reason": f"{url} is not served (404): the server has no expert-load endpoint"}
    if response.status_code != 200:
        message = error_message(response.status_code, response.content)
        return {"available": False, "reason": f"{url} answered {response.status_code}: {message}"}
    try:
        return {"available": True, "data": response.json()}
    except ValueError as e:
        return {"available": False, "reason": f"{url} answered with something other than JSON: {e}"}
