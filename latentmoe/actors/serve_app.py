"""The Ray Serve application: an autoscaled ingress deployment with two front doors, and the attention
shards as a second autoscaled deployment behind it.

HTTP (OpenAI-compatible, FastAPI) and gRPC (``latentmoe.v1.Generator`` and ``grpc.health.v1``) are served by
the same ingress replicas. The ingress is thin: wire formats are parsed in ``latentmoe.proto``, and each
request goes through its engine client (``latentmoe.actors.engine_client``, injected) to an attention shard
that Serve picks by load. The coordinator (a detached, named actor that the first replica creates with the
expert shards) keeps the membership and answers health and expert-load questions; it is on no token's path.

    serve run latentmoe.actors.serve_app:build_app attention_shards=1:2 expert_shards=2
"""


import asyncio
import dataclasses
import hmac
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from latentmoe.actors.attention_shard import AttentionShardDeployment, OverloadedError
from latentmoe.actors.cluster import start_coordinator
from latentmoe.actors.engine_client import NoShardError, OutputTimeoutError, ShardClient, serve_opener, unwrap
from latentmoe.actors.names import COORDINATOR_NAME, INGRESS_DEPLOYMENT
from latentmoe.actors.placement import off_shard_nodes
from latentmoe.engine.engine_config import EngineConfig, reject_unknown_keys
from latentmoe.proto import openai_api as oai

logger = logging.getLogger(__name__)

GRPC_SERVICERS = [
    "latentmoe.actors.grpc_ingress.add_generator_servicer",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


@dataclass
class ServeArgs:
    """The application's arguments (``args:`` in a Serve config file); unknown keys are rejected."""

    model: str | None = None  # checkpoint directory; None: the built-in tiny model
    served_model_name: str | None = None  # the name clients put in "model" (default: the directory's name)
    # attention shards: N (fixed) or "MIN:MAX" (Serve autoscales them on their ongoing requests)
    attention_shards: int | str = 1
    expert_shards: int = 2
    engine: dict = dataclasses.field(default_factory=dict)  # EngineConfig fields (dtype, device, block_size, ...)
    coordinator_name: str = COORDINATOR_NAME
    max_num_requests: int = 256  # requests in flight per attention shard; more get 503 / RESOURCE_EXHAUSTED
    # attention autoscaling: ongoing requests per shard it aims at, and how long load must stay over / under
    # it before a shard is added / removed (after the last one leaves, Ray's autoscaler removes the idle node)
    target_shard_requests: float = 16
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    # how often the ongoing requests are reported to Serve's autoscaler, and the window it averages them over
    # (Serve's own defaults, 10 s and 30 s, made a burst wait 6-11 s for a second shard to be asked for)
    autoscaling_metrics_interval_s: float = 2.0
    autoscaling_look_back_s: float = 10.0
    # requests waiting at the ingress for a free attention shard (Serve's queue); more get 503 at once
    max_queued_shard_requests: int = 64
    drain_timeout_s: float = 30.0  # a leaving shard finishes its requests this long, then hands them over
    # another application's attention shards to use (a second front door on the same engine, e.g. one with an
    # API key): this application then starts none of its own
    attention_app: str | None = None
    place_by_role: bool | None = None  # shards on attention_node / expert_node nodes; None: if the cluster has them
    max_body_bytes: int = 1 << 20  # HTTP bodies and gRPC request messages; larger ones get 413 / INVALID_ARGUMENT
    # Clients must send "Authorization: Bearer <key>" (HTTP /v1/*, and gRPC metadata for Generator) when a key
    # is set. api_key is visible in the Serve config; api_key_env names an environment variable of the Ray
    # nodes to read it from instead (a Kubernetes Secret), when api_key is not given.
    api_key: str | None = None
    api_key_env: str | None = "LATENTMOE_API_KEY"
    step_timeout_s: float = 120.0  # a step not done by then is a fault (the shard that did not answer is replaced)
    recovery_timeout_s: float | None = None  # how long a replacement shard may take to load (None: start_timeout_s)
    # the longest wait for the router's next output for one request; then the request is aborted and the client
    # gets 503 / UNAVAILABLE. None: step_timeout_s + recovery_timeout_s + 30 (a recovery is silent that long)
    output_timeout_s: float | None = None
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16
    max_ongoing_requests: int = 64
    max_queued_requests: int = 64
    # logical CPUs an ingress replica reserves: none by default, so that one placed on a shard's node never takes
    # the CPU the shard asks for (the ingress parses and forwards; the shards compute)
    replica_num_cpus: float = 0.0
    start_timeout_s: float = 300.0

    @property
    def attention_range(self) -> tuple[int, int]:
        """(min, max) attention shards."""
        value = self.attention_shards
        low, _, high = value.partition(":") if isinstance(value, str) else (value, "", value)
        try:
            low, high = int(low), int(high or low)
        except (TypeError, ValueError):
            raise ValueError(f"attention_shards must be N or MIN:MAX, got {value!r}") from None
        if not 1 <= low <= high:
            raise ValueError(f"attention_shards must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
        return low, high

    def resolved_api_key(self) -> str | None:
        return self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None) or None

    def resolved_output_timeout_s(self) -> float:
        if self.output_timeout_s is not None:
            return self.output_timeout_s
        recovery = self.start_timeout_s if self.recovery_timeout_s is None else self.recovery_timeout_s
        return self.step_timeout_s + recovery + 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeArgs":
        reject_unknown_keys(cls, d, "application argument")
        args = cls(**d)
        args.attention_range  # noqa: B018: validates
        for name in ("expert_shards", "max_num_requests", "min_replicas", "max_replicas", "max_queued_shard_requests"):
            value = getattr(args, name)
            if isinstance(value, str) and value.isdigit():  # `serve run ... attention_shards=2` passes strings
                setattr(args, name, value := int(value))
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("step_timeout_s", "recovery_timeout_s", "output_timeout_s", "start_timeout_s",
                     "target_shard_requests", "upscale_delay_s", "downscale_delay_s", "drain_timeout_s",
                     "autoscaling_metrics_interval_s", "autoscaling_look_back_s"):
            value = getattr(args, name)
            if isinstance(value, str):
                setattr(args, name, value := float(value))
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if args.api_key is not None and (not isinstance(args.api_key, str) or not args.api_key):
            raise ValueError("api_key must be a non-empty string")
        return args


_DASHBOARD = (Path(__file__).parent / "static" / "dashboard.html").read_text()

app = FastAPI(title="latentmoe", description="OpenAI-compatible API for DeepSeek-V2-family MoE models")


def _error(e: oai.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class ControlTimeoutError(Exception):
    """The coordinator did not answer in time."""


async def _within(awaitable, timeout_s: float, what: str):
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise ControlTimeoutError(f"the coordinator did not answer {what} within {timeout_s:g} s") from None


def _overloaded(e: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(e, (OverloadedError, BackPressureError))


def _engine_error(e: BaseException) -> oai.ApiError:
    """What the engine raised -> the client's error: bad input 400, overload 503, the rest 503 as well."""
    e = unwrap(e)
    if _overloaded(e):
        return oai.ApiError(503, str(e) or "the server is at capacity; retry later", code="overloaded")
    if isinstance(e, (OutputTimeoutError, ControlTimeoutError)):
        return oai.ApiError(503, str(e), code="timeout")
    if isinstance(e, NoShardError):
        return oai.ApiError(503, str(e), code="unavailable")
    if isinstance(e, (ValueError, TypeError)):
        message = str(e)
        param = "prompt" if "prompt" in message or "token id" in message or "context length" in message else None
        return oai.ApiError(400, message.splitlines()[-1] if "\n" in message else message, param)
    logger.error("request failed: %r", e)
    return oai.ApiError(503, f"the engine is unavailable: {e}", code="unavailable")


def _check_parsed(request) -> None:
    from latentmoe.actors.grpc_ingress import MalformedRequest

    if isinstance(request, MalformedRequest):
        raise ValueError(str(request))


def _set_grpc_error(grpc_context, e: BaseException) -> None:
    e = unwrap(e)
    if _overloaded(e):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(e, (ValueError, TypeError)):
        code = grpc.StatusCode.INVALID_ARGUMENT
    else:
        code = grpc.StatusCode.UNAVAILABLE
    grpc_context.set_code(code)
    grpc_context.set_details(str(e).splitlines()[-1] if str(e) else type(e).__name__)


# (defined before the deployment: Serve pickles the class when it is decorated, with the globals it sees then)
def _wait_for_attention(coordinator, timeout_s: float) -> dict:
    """The coordinator's info once an attention shard has registered (the context length comes from one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = ray.get(coordinator.start.remote(), timeout=timeout_s + 30)
        if info["max_model_len"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if info["max_model_len"] is None:
        raise RuntimeError(f"no attention shard came up within {timeout_s:g} s")
    return info


def _cluster_has_roles() -> bool:
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE

    if not ray.is_initialized():
        return True
    have = ray.cluster_resources()
    return bool(have.get(ATTENTION_RESOURCE) and have.get(EXPERT_RESOURCE))


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class LatentMoEServer:
    def __init__(self, args: dict, shards=None, engine: ShardClient | None = None):
        """``shards``: the attention deployment's handle (Serve passes it); ``engine``: an engine client to use
        instead (anything with ``ShardClient``'s methods: tests inject one)."""
        self.args = ServeArgs.from_dict(args)
        model = self.args.model
        if model is None:
            from latentmoe.model.tiny import default_model_dir

            model = str(default_model_dir())
        config = EngineConfig.from_dict({"model": model, **self.args.engine})
        self.model_name = self.args.served_model_name or model.rstrip("/").split("/")[-1]
        from latentmoe.actors.metrics import requests_counter

        self._requests = requests_counter()  # the requests refused here, before the engine sees them
        self.api_key = self.args.resolved_api_key()
        self.output_timeout_s = self.args.resolved_output_timeout_s()
        from latentmoe.model.tokenizer import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_dir(model)
        except FileNotFoundError:
            self.tokenizer = None
        if engine is None:
            from latentmoe.actors.metrics import ServingMetrics

            if shards is None:
                from latentmoe.actors.names import ATTENTION_DEPLOYMENT

                shards = serve.get_deployment_handle(ATTENTION_DEPLOYMENT, self.args.attention_app)
            coordinator = start_coordinator(
                dataclasses.asdict(config), self.args.expert_shards, self.args.coordinator_name,
                timeout_s=self.args.start_timeout_s, step_timeout_s=self.args.step_timeout_s,
                recovery_timeout_s=self.args.recovery_timeout_s,
                place_by_role=_cluster_has_roles() if self.args.place_by_role is None else self.args.place_by_role)
            info = _wait_for_attention(coordinator, self.args.start_timeout_s)
            recovery = self.args.start_timeout_s if self.args.recovery_timeout_s is None else \
                self.args.recovery_timeout_s
            engine = ShardClient(serve_opener(shards), coordinator, self.tokenizer, info,
                                 output_timeout_s=self.output_timeout_s, recovery_timeout_s=recovery,
                                 metrics=ServingMetrics())
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    # ---- the engine, for both doors ---------------------------------------------------------------------------

    async def _stream(self, prompt, params, request_id: str):
        """The engine's outputs for one request; stopping early (the caller went away) aborts it."""
        stream = self.engine.generate(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def abort_request(self, request_id: str) -> bool:
        """Abort a request (called by Serve's gRPC proxy for a stream it dropped; see ``grpc_ingress``): its
        stream ends with a last output whose finish reason is "abort". False if it does not run here."""
        abort = getattr(self.engine, "abort", None)
        return bool(abort is not None and await abort(request_id))

    async def _call(self, awaitable, what: str, timeout_s: float = 30.0):
        return await _within(awaitable, timeout_s, what)

    def _authorized(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _check_http_key(self, request: Request) -> None:
        if not self._authorized(request.headers.get("authorization")):
            raise oai.ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    def _check_grpc_key(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata() or ())
        if not self._authorized(metadata.get("authorization")):
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            grpc_context.set_details("a valid API key is required: send the metadata 'authorization: Bearer <key>'")
            raise PermissionError("missing or wrong API key")

    async def _first_and_rest(self, prompt, params, request_id: str):
        """Start a request and wait for its first output, so that errors surface before a stream starts."""
        stream = self._stream(prompt, params, request_id)
        try:
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise oai.ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                               "model", "model_not_found")

    # ---- HTTP -------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """Open without an API key (for load balancers and probes): the live shards; 503 when the coordinator
        does not answer, the cluster is down, or no attention shard is up."""
        try:
            status = await self._call(self.engine.status(), "the health check", 10.0)
        except Exception as e:  # noqa: BLE001: any failure of the coordinator is "unhealthy"
            return _error(_engine_error(e))
        if status.get("error"):
            return _error(oai.ApiError(503, f"the cluster is down: {status['error']}", code="unavailable"))
        if not status["attention_shards"]:
            return _error(oai.ApiError(503, "no attention shard is up", code="unavailable"))
        return {"status": "ok", "attention_shards": status["attention_shards"],
                "expert_shards": status["expert_shards"], "epoch": status["epoch"],
                "live_requests": status["num_running"] + status["num_waiting"],
                "scale_outs": status["num_scale_outs"], "scale_ins": status["num_scale_ins"],
                "recoveries": status["num_recoveries"], "moved_requests": getattr(self.engine, "num_moves", 0),
                "step_ms": status.get("step_ms"), "steps": status.get("num_steps"),
                "step_s": status.get("step_s")}

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_http_key(request)
        except oai.ApiError as e:
            return _error(e)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "latentmoe", "max_model_len": self.max_model_len}]}

    @app.get("/v1/cache")
    async def cache(self, request: Request):
        try:
            self._check_http_key(request)
            return await self._call(self.engine.cache_stats(), "the cache statistics")
        except oai.ApiError as e:
            return _error(e)
        except Exception as e:  # noqa: BLE001
            return _error(_engine_error(e))

    @app.get("/v1/expert-load")
    async def expert_load(self, request: Request, window_s: str = "60"):
        """Tokens per (MoE layer, expert), per expert shard, devices per token, over the last window_s seconds."""
        try:
            self._check_http_key(request)
            window = float(window_s)
            return await self._call(self.engine.expert_load(window), "the expert load")
        except oai.ApiError as e:
            return _error(e)
        except ValueError:
            return _error(oai.bad_request(f"window_s must be a number in (0, 3600], got {window_s!r}", "window_s"))
        except Exception as e:  # noqa: BLE001
            return _error(_engine_error(e))

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard(self):
        return HTMLResponse(_DASHBOARD)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    def _token_text(self, token_id: int) -> str:
        """A token's text (special tokens included), for logprobs."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            self._token_texts[token_id] = text
        return text

    def _tokenize_all(self, req) -> tuple[list[list[int]], list[str]]:
        """Every prompt of a request tokenized and checked before any runs (400 naming the bad one's index)."""
        from latentmoe.engine.engine import tokenize_prompt

        try:
            req.params.check_vocab(self.engine.vocab_size)
        except ValueError as e:
            raise oai.bad_request(str(e), "logit_bias") from None
        ids, texts = [], []
        for i, prompt in enumerate(req.prompts):
            try:
                ids.append(tokenize_prompt(self.tokenizer, self.engine.vocab_size, self.max_model_len, prompt))
            except ValueError as e:
                raise oai.bad_request(f"prompt[{i}]: {e}" if len(req.prompts) > 1 else str(e), "prompt") from None
            if req.echo:
                texts.append(prompt if isinstance(prompt, str) else self.tokenizer.decode(
                    prompt, skip_special_tokens=req.params.skip_special_tokens) if self.tokenizer else "")
        return ids, texts

    async def _openai(self, request: Request, chat: bool):
        streams, engine_called = [], False
        try:
            self._check_http_key(request)
            body = oai.decode_body(await request.body(), self.args.max_body_bytes)
            req = oai.parse_chat(body, self.tokenizer, self.max_model_len) if chat else oai.parse_completion(body)
            self._check_model(req.model)
            prompt_ids, prompt_texts = self._tokenize_all(req)
            engine_called = True  # from here on the engine client counts how requests end
            try:
                for i, ids in enumerate(prompt_ids):
                    request_id = req.request_id if len(prompt_ids) == 1 else f"{req.request_id}-{i}"
                    streams.append(await self._first_and_rest(ids, req.params, request_id))
            except Exception as e:
                for _, stream in streams:
                    await stream.aclose()
                raise _engine_error(e) from None
        except oai.ApiError as e:
            if e.status == 400 and not engine_called:
                self._requests.inc(tags={"status": "invalid"})
            return _error(e)
        builder = oai.ResponseBuilder(req, prompt_ids, prompt_texts, self._token_text)
        if not req.stream:
            async def final(first, stream):
                out = first
                async for out in stream:
                    pass
                return out

            try:
                outs = await asyncio.gather(*(final(first, stream) for first, stream in streams))
            except Exception as e:  # noqa: BLE001
                return _error(_engine_error(e))
            finally:
                for _, stream in streams:
                    await stream.aclose()
            return builder.response(outs)

        async def events():
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i, first, stream):
                try:
                    await queue.put((i, first))
                    async for out in stream:
                        await queue.put((i, out))
                    await queue.put((i, None))
                except Exception as e:  # noqa: BLE001: handed to the consumer
                    await queue.put((i, e))

            tasks = [asyncio.get_running_loop().create_task(pump(i, first, stream))
                     for i, (first, stream) in enumerate(streams)]
            try:
                remaining = len(tasks)
                while remaining:
                    i, item = await queue.get()
                    if item is None:
                        remaining -= 1
                        continue
                    if isinstance(item, Exception):
                        raise item
                    chunk = builder.chunk(i, item)
                    if chunk is not None:
                        yield oai.sse(chunk)
                if req.include_usage:
                    yield oai.sse(builder.usage_chunk())
                yield oai.sse("[DONE]")
            except Exception as e:  # the engine failed mid-stream: say so in the stream, then end it
                yield oai.sse(_engine_error(e).body())
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for _, stream in streams:
                    await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- vLLM's extra endpoints ---------------------------------------------------------------------------------

    async def _json_body(self, request: Request, known: set[str]) -> dict:
        self._check_http_key(request)
        body = oai.decode_body(await request.body(), self.args.max_body_bytes)
        unknown = sorted(set(body) - known)
        if unknown:
            raise oai.bad_request(f"unknown parameter(s) {unknown}", unknown[0])
        if body.get("model") is not None:
            self._check_model(body["model"])
        if self.tokenizer is None:
            raise oai.bad_request("this checkpoint has no tokenizer.json")
        return body

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's ``/tokenize``: ``prompt`` (text) or ``messages`` (chat template) -> token ids."""
        try:
            body = await self._json_body(request, {"model", "prompt", "messages", "add_special_tokens",
                                                   "add_generation_prompt", "return_token_strs"})
            for name in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
                if not isinstance(body.get(name, True), bool):
                    raise oai.bad_request(f"{name} must be a boolean", name)
            if ("prompt" in body) == ("messages" in body):
                raise oai.bad_request("give prompt (a string) or messages", "prompt")
            if "messages" in body:
                chat = oai.parse_chat({"model": self.model_name, "messages": body["messages"]}, self.tokenizer,
                                      self.max_model_len)
                text = chat.prompt if body.get("add_generation_prompt", True) else self.tokenizer.apply_chat_template(
                    [{"role": m["role"], "content": m["content"]} for m in body["messages"]],
                    add_generation_prompt=False)
            else:
                text = body["prompt"]
                if not isinstance(text, str):
                    raise oai.bad_request("prompt must be a string", "prompt")
            ids = self.tokenizer.encode(text, add_bos=None if body.get("add_special_tokens", True) else False)
        except oai.ApiError as e:
            return _error(e)
        strs = [self._token_text(t) for t in ids] if body.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """vLLM's ``/detokenize``: ``tokens`` -> ``prompt`` (the text)."""
        try:
            body = await self._json_body(request, {"model", "tokens"})
            tokens = body.get("tokens")
            if not oai._is_ids(tokens):
                raise oai.bad_request("tokens must be a list of token ids", "tokens")
            bad = [t for t in tokens if not 0 <= t < self.engine.vocab_size]
            if bad:
                raise oai.bad_request(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.engine.vocab_size})",
                                      "tokens")
        except oai.ApiError as e:
            return _error(e)
        return {"prompt": self.tokenizer.decode(tokens, skip_special_tokens=False)}

    @app.get("/version")
    async def version(self):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"version": version("latentmoe")}
        except PackageNotFoundError:
            return {"version": "0.1.0"}

    # ---- gRPC: latentmoe.v1.Generator ---------------------------------------------------------------------------

    async def _grpc_start(self, request, grpc_context):
        from latentmoe.proto.convert import request_from_proto

        self._check_grpc_key(grpc_context)
        try:
            _check_parsed(request)
            size = request.ByteSize()
            if size > self.args.max_body_bytes:
                raise ValueError(f"the request is {size} bytes; the limit is {self.args.max_body_bytes}")
            prompt, params, request_id, model = request_from_proto(request)
            if model and model != self.model_name:
                raise ValueError(f"model: {model!r} does not exist; this server serves {self.model_name!r}")
            request_id = request_id or f"grpc-{uuid.uuid4().hex}"
        except Exception as e:
            if isinstance(e, (ValueError, TypeError)):
                self._requests.inc(tags={"status": "invalid"})
            _set_grpc_error(grpc_context, e)
            raise
        try:
            return (params, *await self._first_and_rest(prompt, params, request_id))
        except Exception as e:
            _set_grpc_error(grpc_context, e)
            raise

    async def Generate(self, request, grpc_context):  # noqa: N802 (gRPC method name)
        """The whole completion in one response."""
        from latentmoe.proto.convert import output_to_proto

        params, out, stream = await self._grpc_start(request, grpc_context)
        prompt_logprobs = out.prompt_logprobs
        try:
            async for out in stream:
                prompt_logprobs = out.prompt_logprobs or prompt_logprobs
        except Exception as e:
            _set_grpc_error(grpc_context, e)
            raise
        out.prompt_logprobs = prompt_logprobs
        return output_to_proto(out, delta=False, params=params, token_text=self._token_text)

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        """One response per step that produced text or tokens; the last has ``finished`` and usage."""
        from latentmoe.proto.convert import output_to_proto

        params, out, stream = await self._grpc_start(request, grpc_context)
        sent_prompt = out.prompt_logprobs is not None
        try:
            yield output_to_proto(out, delta=True, params=params, token_text=self._token_text)
            async for out in stream:
                if sent_prompt:  # the prompt's logprobs go out once
                    out.prompt_logprobs = None
                sent_prompt = sent_prompt or out.prompt_logprobs is not None
                yield output_to_proto(out, delta=True, params=params, token_text=self._token_text)
        except Exception as e:
            _set_grpc_error(grpc_context, e)
            raise
        finally:
            await stream.aclose()

    async def GetExpertLoad(self, request, grpc_context):  # noqa: N802
        from latentmoe.proto.convert import expert_load_to_proto

        self._check_grpc_key(grpc_context)
        try:
            _check_parsed(request)
            return expert_load_to_proto(await self._call(self.engine.expert_load(request.window_s or 60.0),
                                                         "the expert load"))
        except Exception as e:
            _set_grpc_error(grpc_context, e)
            raise

    # ---- gRPC: grpc.health.v1.Health ----------------------------------------------------------------------------

    async def Check(self, request):  # noqa: N802
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING
        try:
            state = await asyncio.wait_for(self.engine.status(), 10)
            if state.get("error") or not state["attention_shards"]:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
        except Exception:  # noqa: BLE001: any failure of the coordinator is "not serving"
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request):  # noqa: N802
        while True:
            yield await self.Check(request)
            await asyncio.sleep(5)


def attention_deployment(parsed: "ServeArgs", config: dict):
    """The attention shards' deployment, bound: autoscaled min..max on ongoing requests, on attention nodes."""
    low, high = parsed.attention_range
    gpu = config.get("device", "cpu").startswith("cuda")
    place_by_role = parsed.place_by_role
    from latentmoe.cluster.shards import shard_runtime_env

    actor_options: dict = {"num_cpus": 1, "num_gpus": 1 if gpu else 0, "runtime_env": shard_runtime_env()}
    if place_by_role is None:
        place_by_role = _cluster_has_roles()
    if place_by_role:
        from latentmoe.actors.placement import ATTENTION_RESOURCE

        actor_options["resources"] = {ATTENTION_RESOURCE: 1.0}
    options = {"collective_timeout_s": parsed.step_timeout_s / 2, "start_timeout_s": parsed.start_timeout_s,
               "max_num_requests": parsed.max_num_requests,
               "coordinator_args": {"num_expert": parsed.expert_shards, "step_timeout_s": parsed.step_timeout_s,
                                    "recovery_timeout_s": parsed.recovery_timeout_s,
                                    "place_by_role": bool(place_by_role)}}
    from ray.serve.config import RequestRouterConfig

    from latentmoe.actors.shard_router import ROUTER_PATH, ROUTING_STATS_PERIOD_S

    return AttentionShardDeployment.options(
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_PATH,
                                                  request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
        autoscaling_config={"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                            "target_ongoing_requests": parsed.target_shard_requests,
                            "upscale_delay_s": parsed.upscale_delay_s, "downscale_delay_s": parsed.downscale_delay_s,
                            "metrics_interval_s": parsed.autoscaling_metrics_interval_s,
                            "look_back_period_s": parsed.autoscaling_look_back_s},
        max_ongoing_requests=parsed.max_num_requests, max_queued_requests=parsed.max_queued_shard_requests,
        graceful_shutdown_timeout_s=parsed.drain_timeout_s, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0, ray_actor_options=actor_options,
    ).bind(config, parsed.coordinator_name, options)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for ``serve run`` / ``serve deploy`` / ``serveConfigV2``."""
    parsed = ServeArgs.from_dict(dict(args or {}))
    model = parsed.model
    if model is None:
        from latentmoe.model.tiny import default_model_dir

        model = str(default_model_dir())
    config = dataclasses.asdict(EngineConfig.from_dict({"model": model, **parsed.engine}))
    shards = attention_deployment(parsed, config) if parsed.attention_app is None else None
    return LatentMoEServer.options(
        autoscaling_config={"min_replicas": parsed.min_replicas, "max_replicas": parsed.max_replicas,
                            "target_ongoing_requests": parsed.target_ongoing_requests},
        max_ongoing_requests=parsed.max_ongoing_requests,
        max_queued_requests=parsed.max_queued_requests,
        ray_actor_options={"num_cpus": parsed.replica_num_cpus, **off_shard_nodes()},
    ).bind(dict(args or {}), shards)
