"""A bounded soak test of a running server: minutes of mixed load, then a check that nothing leaked.

``run_soak`` runs ``concurrency`` workers until a deadline; each sends, at random (seeded), one of
three kinds of request: *good* (completions and chat over HTTP, streamed or not, and gRPC Generate /
GenerateStream, checked against greedy outputs of the single-process engine), *disconnect* (a long
stream the client drops after a few chunks) and *bad* (a request the server must refuse with one exact
status: 400, 404, 413 or INVALID_ARGUMENT). It then waits for the server to go idle and returns a
JSON-able report: requests by kind and outcome, the first errors, the RSS of the Ray processes on this
machine (start, end, max, by process title), the cache at the end, and ``passed`` with its reasons.

The server may answer a good or disconnect request 503 "overloaded" / RESOURCE_EXHAUSTED while the
aborts of dropped streams are still on their way; such a request is retried (and counted), as the API
tells clients to. Anything else that is not the expected answer is an error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import httpx2 as httpx

from latentmoe.engine.sampling_params import SamplingParams
from latentmoe.loadtest.clients import sse_chunks
from latentmoe.proto import generate_pb2_grpc
from latentmoe.proto.convert import request_to_proto

GOOD_VARIANTS = ("http_completion", "http_completion_stream", "http_chat", "http_chat_stream", "grpc_generate",
                 "grpc_stream")
MEMORY_BOUND_MIB = 200.0  # default bound on the growth of the Ray processes' total RSS, start to end
DEFAULT_MAX_BODY_BYTES = 1 << 20  # ServeArgs.max_body_bytes' default
KIND_WEIGHTS = {"good": 0.6, "disconnect": 0.15, "bad": 0.25}
MAX_OVERLOAD_RETRIES = 20
MAX_ERRORS_KEPT = 20


# ---- the prompts and what they must give ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One prompt of the pool: ``prompt`` for completions and gRPC, or ``messages`` for chat."""

    key: str
    max_tokens: int
    prompt: str | list[int] | None = None
    messages: tuple[dict, ...] | None = None


POOL = (
    Case("ids-5x4", 16, prompt=[5] * 4),
    Case("ids-5x24", 8, prompt=[5] * 24),
    Case("ids-5x40", 12, prompt=[5] * 40),  # three blocks of 16
    Case("ids-987", 4, prompt=[9, 8, 7]),
    Case("text-experts", 12, prompt="The experts of a mixture"),
    Case("text-hello", 6, prompt="Hello experts"),
    Case("text-long", 10, prompt="token layer shard router latent cache attention " * 6),
    Case("chat-brief", 12, messages=({"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Which experts are hot?"})),
    Case("chat-user", 7, messages=({"role": "user", "content": "Name a shard."},)),
)


def expected_outputs(llm, pool: tuple[Case, ...] = POOL) -> dict[str, dict]:
    """Greedy outputs of ``llm`` (a single-process ``latentmoe.LLM``) for every case of the pool, by key.

    Chat cases are rendered with the checkpoint's chat template, as the server renders them."""
    prompts = [c.prompt if c.messages is None else llm.tokenizer.apply_chat_template(list(c.messages))
               for c in pool]
    params = [SamplingParams(max_tokens=c.max_tokens, temperature=0.0) for c in pool]
    outs = llm.generate(prompts, params)
    return {c.key: {"text": o.text, "token_ids": list(o.token_ids), "num_tokens": len(o.token_ids),
                    "finish_reason": o.finish_reason, "prompt_tokens": len(o.prompt_token_ids)}
            for c, o in zip(pool, outs)}


# ---- memory of the Ray processes on this machine ----------------------------------------------------------------

def _psutil():
    import psutil  # a dependency; imported here so that importing this module stays light

    return psutil


def ray_process_title(cmdline: list[str], name: str = "") -> str | None:
    """The group a process counts in: ``ray::ShardActor`` (method names cut off), ``raylet``,
    ``gcs_server``; None for any other process and for idle pooled workers (``ray::IDLE``), which Ray
    starts and ends on its own."""
    title = " ".join(cmdline).strip()
    if title.startswith("ray::"):
        rest = title[len("ray::"):]
        for sep in (".", "(", " "):
            rest = rest.split(sep, 1)[0]
        return None if not rest or rest.startswith("IDLE") else f"ray::{rest}"
    exe = os.path.basename(cmdline[0]) if cmdline else name
    return exe if exe in ("raylet", "gcs_server") else None


_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def cluster_pids(procs: list[tuple[int, int, list[str]]], gcs_port: int) -> set[int]:
    """The processes of the Ray cluster whose GCS listens on ``gcs_port``, out of ``(pid, ppid, cmdline)``:
    those whose command line names its session (raylets, GCS, agents; the session is found on the command
    lines that say ``--gcs-address=HOST:PORT``) and all their descendants (the workers, whose titles name
    nothing)."""
    address = re.compile(rf"--gcs-address=[^\s=]+:{gcs_port}(?!\d)")
    lines = {pid: " ".join(cmdline) for pid, _, cmdline in procs}
    sessions = {m for line in lines.values() if address.search(line) for m in _SESSION.findall(line)}
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in procs:
        children.setdefault(ppid, []).append(pid)
    todo = [pid for pid, line in lines.items() if any(session in line for session in sessions)]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def connected_gcs_port() -> int | None:
    """The GCS port of the Ray cluster this process is connected to (``ray.init``), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])


def sample_memory(title_of: Callable[[list[str], str], str | None] = ray_process_title,
                  gcs_port: int | None = None) -> dict[str, dict]:
    """RSS by process title (``title_of(cmdline, name)``; None leaves a process out):
    ``{title: {"rss_mib", "pids"}}``, over the processes of one Ray cluster when ``gcs_port`` is given (see
    ``cluster_pids``), else over all. Processes that end while being read are skipped."""
    psutil = _psutil()
    procs = [(p, p.info["cmdline"] or [], p.info["name"] or "")
             for p in psutil.process_iter(["pid", "ppid", "name", "cmdline"])]
    scope = None if gcs_port is None else cluster_pids(
        [(p.info["pid"], p.info["ppid"], cmdline) for p, cmdline, _ in procs], gcs_port)
    groups: dict[str, dict] = {}
    for proc, cmdline, name in procs:
        title = title_of(cmdline, name)
        if title is None or (scope is not None and proc.info["pid"] not in scope):
            continue
        try:
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        group = groups.setdefault(title, {"rss_mib": 0.0, "pids": []})
        group["rss_mib"] += rss / 2**20
        group["pids"].append(proc.info["pid"])
    for group in groups.values():
        group["pids"].sort()
    return groups


def total_mib(sample: dict[str, dict]) -> float:
    return sum(g["rss_mib"] for g in sample.values())


def memory_report(start: dict[str, dict], end: dict[str, dict], max_mib: float, num_samples: int,
                  bound_mib: float) -> dict:
    """Totals, growth and per-title figures of two ``sample_memory`` results; ``restarted`` lists the titles
    whose processes changed (a restarted or replaced actor)."""
    start_mib, end_mib = total_mib(start), total_mib(end)
    titles = sorted(set(start) | set(end))
    return {
        "bound_mib": bound_mib, "start_mib": round(start_mib, 1), "end_mib": round(end_mib, 1),
        "max_mib": round(max(max_mib, start_mib, end_mib), 1), "growth_mib": round(end_mib - start_mib, 1),
        "growth_pct": round(100 * (end_mib - start_mib) / start_mib, 2) if start_mib else None,
        "num_samples": num_samples,
        "processes": {t: {"start_mib": round(start.get(t, {}).get("rss_mib", 0.0), 1),
                          "end_mib": round(end.get(t, {}).get("rss_mib", 0.0), 1),
                          "num_start": len(start.get(t, {}).get("pids", [])),
                          "num_end": len(end.get(t, {}).get("pids", []))} for t in titles},
        "restarted": [t for t in titles if start.get(t, {}).get("pids") != end.get(t, {}).get("pids")],
    }


# ---- counting -----------------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Requests by kind, variant and outcome; latency by kind; the first errors with their details."""

    requests: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    num_errors: int = 0
    num_overload_retries: int = 0

    def record(self, kind: str, variant: str, outcome: str, seconds: float, detail: str | None = None,
               at_s: float | None = None) -> None:
        by_outcome = self.requests.setdefault(kind, {}).setdefault(variant, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        lat = self.latency.setdefault(kind, {"count": 0, "sum_s": 0.0, "max_s": 0.0})
        lat["count"] += 1
        lat["sum_s"] += seconds
        lat["max_s"] = max(lat["max_s"], seconds)
        if not is_ok(kind, outcome):
            self.num_errors += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append({"kind": kind, "variant": variant, "outcome": outcome, "detail": detail,
                                    "at_s": None if at_s is None else round(at_s, 2)})

    def outcomes(self, kind: str) -> dict[str, int]:
        """Outcome counts of one kind, over its variants."""
        total: dict[str, int] = {}
        for by_outcome in self.requests.get(kind, {}).values():
            for outcome, n in by_outcome.items():
                total[outcome] = total.get(outcome, 0) + n
        return total

    def latency_report(self) -> dict:
        return {k: {"count": v["count"], "mean_s": round(v["sum_s"] / v["count"], 4) if v["count"] else None,
                    "sum_s": round(v["sum_s"], 3), "max_s": round(v["max_s"], 4)} for k, v in self.latency.items()}


def is_ok(kind: str, outcome: str) -> bool:
    """A disconnect whose stream finished before the client dropped it tested nothing, but is no error."""
    return outcome == "ok" or (kind == "disconnect" and outcome == "ended_early")


def verdict(report: dict) -> list[str]:
    """Why a soak report fails (empty: it passed): wrong answers, unexpected statuses, requests or blocks
    left in the server, memory growth beyond ``report["memory"]["bound_mib"]``."""
    failures = []
    for kind, variants in report["requests"].items():
        bad = {}
        for by_outcome in variants.values():
            for outcome, n in by_outcome.items():
                if not is_ok(kind, outcome):
                    bad[outcome] = bad.get(outcome, 0) + n
        if bad:
            failures.append(f"{sum(bad.values())} {kind} request(s) not answered as expected: "
                            + ", ".join(f"{o} x{n}" for o, n in sorted(bad.items())))
    num_good_ok = sum(v.get("ok", 0) for v in report["requests"].get("good", {}).values())
    if num_good_ok == 0:
        failures.append("no good request was answered")
    cache = report.get("cache_at_end")
    if not cache or "error" in cache:
        failures.append(f"the cache statistics could not be read at the end: {cache}")
    elif not (cache["num_free_blocks"] == cache["num_blocks"] and cache["num_running"] == cache["num_waiting"] == 0):
        failures.append(f"the cache is not idle at the end: {cache['num_blocks'] - cache['num_free_blocks']} of "
                        f"{cache['num_blocks']} blocks in use, {cache['num_running']} running, "
                        f"{cache['num_waiting']} waiting")
    health = report.get("health_at_end")
    if not health or health.get("live_requests") != 0:
        failures.append(f"the server still has live requests at the end: {health}")
    memory = report.get("memory") or {}
    if memory.get("available") and memory["growth_mib"] > memory["bound_mib"]:
        failures.append(f"RSS of the Ray processes grew by {memory['growth_mib']:.1f} MiB "
                        f"({memory['start_mib']:.1f} -> {memory['end_mib']:.1f}), more than the bound of "
                        f"{memory['bound_mib']:g} MiB")
    return failures


# ---- the requests -------------------------------------------------------------------------------------------------

class _Overloaded(Exception):
    """503 "overloaded" / RESOURCE_EXHAUSTED: retried."""


class _Status(Exception):
    """Any other status than the one expected."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _http_error(status: int, content: bytes) -> Exception:
    try:
        error = json.loads(content)["error"]
        message, code = str(error.get("message")), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = content.decode("utf-8", "replace")[:300], None
    return _Overloaded(message) if status == 503 and code == "overloaded" else _Status(str(status), message)


def _grpc_error(e: grpc.aio.AioRpcError) -> Exception:
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _Overloaded(e.details())
    return _Status(e.code().name, e.details() or "")


def _compare(got: dict, expected: dict) -> tuple[str, str | None]:
    """Every field of ``got`` against ``expected`` (gRPC has token ids, HTTP only text and counts)."""
    wrong = {k: {"got": got[k], "expected": expected[k]} for k in got if got[k] != expected[k]}
    return ("ok", None) if not wrong else ("wrong_output", json.dumps(wrong, ensure_ascii=False)[:600])


class _Soak:
    """The clients, the expected outputs and the request makers of one run."""

    def __init__(self, http_url: str, grpc_target: str, model: str, expected: dict, pool: tuple[Case, ...],
                 api_key: str | None, max_body_bytes: int, timeout_s: float):
        self.model, self.expected, self.max_body_bytes, self.timeout_s = model, expected, max_body_bytes, timeout_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.metadata = tuple(headers.items())
        self.http = httpx.AsyncClient(base_url=http_url.rstrip("/"), headers=headers,
                                      timeout=httpx.Timeout(timeout_s))
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = generate_pb2_grpc.GeneratorStub(self.channel)
        self.completion_cases = [c for c in pool if c.messages is None]
        self.chat_cases = [c for c in pool if c.messages is not None]
        self.max_model_len = 0  # from GET /v1/models, before the bad cases are made
        self.vocab_probe = 10**7  # a token id past any vocabulary
        self.bad: dict[str, Callable[[bool], Any]] = {}

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    # ---- one draw: what to send, decided before it is sent (a retry sends the same) ----------------------------

    def draw(self, rng: random.Random) -> tuple[str, str, Callable[[], Any]]:
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        if kind == "good":
            variant = rng.choice(GOOD_VARIANTS)
            case = rng.choice(self.chat_cases if variant.startswith("http_chat") else self.completion_cases)
            return kind, variant, lambda: self.good(variant, case)
        if kind == "disconnect":
            variant = rng.choice(["http_stream", "grpc_stream"])
            case = rng.choice(self.completion_cases)
            max_tokens, drop_after, pause_s = rng.randint(200, 400), rng.randint(1, 5), rng.uniform(0.0, 0.3)
            send = self.disconnect_http if variant == "http_stream" else self.disconnect_grpc
            return kind, variant, lambda: send(case, max_tokens, drop_after, pause_s)
        variant = rng.choice(sorted(self.bad))
        stream = rng.random() < 0.5
        return kind, variant, lambda: self.bad[variant](stream)

    def every_path(self) -> list[tuple[str, str, Callable[[], Any]]]:
        """One request of each kind and variant ``draw`` picks from, as ``draw`` returns them."""
        case, chat = self.completion_cases[0], self.chat_cases[0]
        sends = [("good", v, functools.partial(self.good, v, chat if v.startswith("http_chat") else case))
                 for v in GOOD_VARIANTS]
        sends += [("disconnect", "http_stream", functools.partial(self.disconnect_http, case, 200, 2, 0.0)),
                  ("disconnect", "grpc_stream", functools.partial(self.disconnect_grpc, case, 200, 2, 0.0))]
        sends += [("bad", v, functools.partial(self.bad[v], stream))
                  for v in sorted(self.bad) for stream in (False, True)]
        return sends

    # ---- good ---------------------------------------------------------------------------------------------------

    async def good(self, variant: str, case: Case) -> tuple[str, str | None]:
        expected = self.expected[case.key]
        if variant.startswith("grpc"):
            got = await self._grpc_generate(case, stream=variant == "grpc_stream")
        else:
            got = await self._http_generate(case, chat=variant.startswith("http_chat"),
                                            stream=variant.endswith("_stream"))
        return _compare(got, expected)

    def _body(self, case: Case, max_tokens: int, stream: bool, ignore_eos: bool = False) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if ignore_eos:
            body["ignore_eos"] = True
        if case.messages is not None:
            body["messages"] = list(case.messages)
        else:
            body["prompt"] = case.prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _http_generate(self, case: Case, chat: bool, stream: bool) -> dict:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = self._body(case, case.max_tokens, stream)
        if not stream:
            r = await self.http.post(path, json=body)
            if r.status_code != 200:
                raise _http_error(r.status_code, r.content)
            out = r.json()
            choice = out["choices"][0]
            return {"text": choice["message"]["content"] if chat else choice["text"],
                    "num_tokens": out["usage"]["completion_tokens"], "finish_reason": choice["finish_reason"]}
        text, finish_reason, num_tokens, done = "", None, None, False
        async with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise _http_error(r.status_code, await r.aread())
            async for chunk in sse_chunks(r):
                if chunk is None:
                    done = True
                    break
                if "error" in chunk:
                    raise _Status("stream_error", str(chunk["error"]))
                for choice in chunk.get("choices") or []:
                    text += (choice["delta"].get("content") or "") if chat else (choice.get("text") or "")
                    finish_reason = choice.get("finish_reason") or finish_reason
                if chunk.get("usage"):
                    num_tokens = chunk["usage"]["completion_tokens"]
        if not done:
            raise _Status("incomplete_stream", "the stream ended before data: [DONE]")
        return {"text": text, "num_tokens": num_tokens, "finish_reason": finish_reason}

    async def _grpc_generate(self, case: Case, stream: bool) -> dict:
        request = request_to_proto(case.prompt, SamplingParams(max_tokens=case.max_tokens, temperature=0.0),
                                   model=self.model)
        try:
            if not stream:
                out = await self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
                text, token_ids, last = out.text, list(out.token_ids), out
            else:
                text, token_ids, last = "", [], None
                async for last in self.stub.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata):
                    text += last.text
                    token_ids += last.token_ids
        except grpc.aio.AioRpcError as e:
            raise _grpc_error(e) from None
        if last is None or not last.finished:
            raise _Status("incomplete_stream", "the stream ended before a finished message")
        return {"text": text, "token_ids": token_ids, "num_tokens": last.usage.completion_tokens,
                "finish_reason": last.finish_reason}

    # ---- disconnect ---------------------------------------------------------------------------------------------

    async def disconnect_http(self, case: Case, max_tokens: int, drop_after: int,
                              pause_s: float) -> tuple[str, str | None]:
        body = self._body(case, max_tokens, stream=True, ignore_eos=True)
        num_chunks = 0
        async with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise _http_error(r.status_code, await r.aread())
            async for chunk in sse_chunks(r):
                if chunk is not None and "error" in chunk:
                    raise _Status("stream_error", str(chunk["error"]))
                if chunk is None or any(c.get("finish_reason") for c in chunk.get("choices") or []):
                    return "ended_early", f"finished after {num_chunks} chunk(s) of {max_tokens} tokens"
                num_chunks += 1
                if num_chunks >= drop_after:
                    break
            await asyncio.sleep(pause_s)
        return "ok", None  # leaving the block closes the response and its connection

    async def disconnect_grpc(self, case: Case, max_tokens: int, drop_after: int,
                              pause_s: float) -> tuple[str, str | None]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        call = self.stub.GenerateStream(request_to_proto(case.prompt, params, model=self.model),
                                        timeout=self.timeout_s, metadata=self.metadata)
        num_chunks = 0
        try:
            async for msg in call:
                if msg.finished:
                    return "ended_early", f"finished after {num_chunks} chunk(s) of {max_tokens} tokens"
                num_chunks += 1
                if num_chunks >= drop_after:
                    break
            await asyncio.sleep(pause_s)
        except grpc.aio.AioRpcError as e:
            raise _grpc_error(e) from None
        finally:
            call.cancel()
        return "ok", None

    # ---- bad ----------------------------------------------------------------------------------------------------

    def bad_cases(self) -> dict[str, Callable[[bool], Any]]:
        """Bad requests by name; each takes ``stream`` (for the gRPC ones: GenerateStream or Generate)."""
        model, limit = self.model, self.max_body_bytes

        def body(stream: bool, **fields) -> dict:
            return {"model": model, "prompt": "hi", "max_tokens": 4, "stream": stream, **fields}

        cases = {
            "http_malformed_json": lambda s: self.bad_http(b'{"model": "' + model.encode() + b'", "prompt": ', 400),
            "http_wrong_type": lambda s: self.bad_http(body(s, max_tokens="x"), 400),
            "http_negative_max_tokens": lambda s: self.bad_http(body(s, max_tokens=-3), 400),
            "http_negative_temperature": lambda s: self.bad_http(body(s, temperature=-1), 400),
            "http_unknown_model": lambda s: self.bad_http(body(s, model=model + "-nope"), 404),
            "http_too_big": lambda s: self.bad_http(body(s, prompt="x" * (limit + 1)), 413),
            "http_empty_prompt": lambda s: self.bad_http(body(s, prompt=[]), 400),
            "http_out_of_vocabulary": lambda s: self.bad_http(body(s, prompt=[5, self.vocab_probe]), 400),
            "http_chat_bad_role": lambda s: self.bad_http(
                {"model": model, "messages": [{"role": "robot", "content": "hi"}], "stream": s}, 400,
                "/v1/chat/completions"),
            "grpc_negative_max_tokens": lambda s: self.bad_grpc("hi", s, max_tokens=-1),
            "grpc_out_of_vocabulary": lambda s: self.bad_grpc([5, self.vocab_probe], s),
            "grpc_empty_prompt": lambda s: self.bad_grpc([], s),
            "grpc_unknown_model": lambda s: self.bad_grpc("hi", s, model=model + "-nope"),
        }
        too_long = [5] * self.max_model_len
        if self.max_model_len and len(json.dumps(body(False, prompt=too_long))) <= limit:
            cases["http_too_long"] = lambda s: self.bad_http(body(s, prompt=too_long), 400)
            cases["grpc_too_long"] = lambda s: self.bad_grpc(too_long, s)
        return cases

    async def bad_http(self, body: dict | bytes, status: int, path: str = "/v1/completions") -> tuple[str, str | None]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await self.http.post(path, content=content, headers={"content-type": "application/json"})
        if r.status_code != status:
            raise _Status(str(r.status_code), f"expected {status}: {r.content[:300]!r}")
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "bad_error_body", f"{status} without an OpenAI error object: {r.content[:300]!r}"
        return ("ok", None) if message else ("bad_error_body", f"{status} with an empty message")

    async def bad_grpc(self, prompt, stream: bool, max_tokens: int = 4,
                       model: str | None = None) -> tuple[str, str | None]:
        request = request_to_proto(prompt, SamplingParams(max_tokens=4, temperature=0.0), model=model or self.model)
        request.params.max_tokens = max_tokens  # past SamplingParams' own check
        try:
            if stream:
                async for _ in self.stub.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata):
                    pass
            else:
                await self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return "ok", None
            raise _Status(e.code().name, f"expected INVALID_ARGUMENT: {e.details()}") from None
        raise _Status("OK", "expected INVALID_ARGUMENT, the request was served")

    # ---- the server's state -------------------------------------------------------------------------------------

    async def get_json(self, path: str) -> dict:
        r = await self.http.get(path, timeout=30)
        if r.status_code != 200:
            raise _Status(str(r.status_code), r.text[:300])
        return r.json()

    async def wait_idle(self, timeout_s: float) -> tuple[dict, dict, float]:
        """Poll ``/v1/cache`` and ``/health`` until no block is used and no request is live (or the time is up):
        the last cache statistics, health and how long it took."""
        start = time.monotonic()
        cache = health = {}
        while True:
            try:
                cache = await self.get_json("/v1/cache")
                health = await self.get_json("/health")
            except Exception as e:  # noqa: BLE001: reported, and judged by verdict()
                cache, health = {"error": f"{type(e).__name__}: {e}"}, {"error": f"{type(e).__name__}: {e}"}
            idle = "error" not in cache and cache["num_free_blocks"] == cache["num_blocks"] and \
                cache["num_running"] == cache["num_waiting"] == 0 and health.get("live_requests") == 0
            if idle or time.monotonic() - start > timeout_s:
                return cache, health, time.monotonic() - start
            await asyncio.sleep(0.2)


async def _send(soak: _Soak, tally: Tally, kind: str, variant: str, send: Callable[[], Any], t0: float) -> None:
    start = time.monotonic()
    for attempt in range(MAX_OVERLOAD_RETRIES + 1):
        try:
            outcome, detail = await send()
        except _Overloaded as e:
            if kind == "bad" or attempt == MAX_OVERLOAD_RETRIES:
                outcome, detail = "unexpected_status:overloaded", str(e)[:300]
                break
            tally.num_overload_retries += 1
            await asyncio.sleep(0.1 * (attempt + 1))
            continue
        except _Status as e:
            outcome, detail = f"unexpected_status:{e.code}", e.message[:600]
        except Exception as e:  # noqa: BLE001: the connection failed, or the answer was not what the API says
            outcome, detail = f"exception:{type(e).__name__}", (str(e) or repr(e))[:600]
        break
    tally.record(kind, variant, outcome, time.monotonic() - start, detail, start - t0)


async def run_soak(http_url: str, grpc_target: str, model: str, expected: dict[str, dict], *,
                   duration_s: float, concurrency: int = 3, seed: int = 0, api_key: str | None = None,
                   memory_bound_mib: float = MEMORY_BOUND_MIB, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                   pool: tuple[Case, ...] = POOL, num_warmup: int = 10, sample_every_s: float = 5.0,
                   idle_timeout_s: float = 60.0, timeout_s: float = 120.0, ray_address: str | None = None,
                   title_of: Callable[[list[str], str], str | None] = ray_process_title,
                   progress: Callable[[dict], None] | None = None) -> dict:
    """Soak the server at ``http_url`` (OpenAI API) and ``grpc_target`` (``host:port``) serving ``model``.

    ``expected``: ``expected_outputs(llm, pool)`` on the same checkpoint. ``max_body_bytes``: the server's
    limit (its ``max_body_bytes`` argument), for the 413 case. Memory is the RSS of the processes on this
    machine that ``title_of`` names (by default Ray's actors, raylets and GCS) and that belong to the Ray
    cluster at ``ray_address`` (``host:port`` of its GCS; default: the cluster this process is connected to,
    else every Ray process on the machine), sampled every ``sample_every_s``; the start is taken after
    ``num_warmup`` good requests and one request on every path (``_Soak.every_path``). ``progress``, if given,
    is called with a small dict of running figures at each sample. Returns the report (see the module)."""
    missing = sorted(c.key for c in pool if c.key not in expected)
    if missing:
        raise ValueError(f"expected outputs are missing for {missing}: build them with expected_outputs(llm, pool)")
    if concurrency < 1 or not duration_s > 0:
        raise ValueError(f"need concurrency >= 1 and duration_s > 0, got {concurrency} and {duration_s}")
    gcs_port = int(ray_address.rsplit(":", 1)[1]) if ray_address else connected_gcs_port()
    soak = _Soak(http_url, grpc_target, model, expected, pool, api_key, max_body_bytes, timeout_s)
    tally = Tally()
    t0 = time.monotonic()
    try:
        models = await soak.get_json("/v1/models")
        served = {m["id"]: m for m in models["data"]}
        if model not in served:
            raise ValueError(f"the server serves {sorted(served)}, not {model!r}")
        soak.max_model_len = int(served[model].get("max_model_len") or 0)
        soak.bad = soak.bad_cases()

        for i in range(num_warmup):
            case = soak.completion_cases[i % len(soak.completion_cases)]
            variant = ("http_completion", "grpc_generate")[i % 2]
            await _send(soak, tally, "good", variant, lambda: soak.good(variant, case), t0)
        # then every path once (each good variant, both dropped streams, each bad request streamed and not), so
        # that what a process allocates on a path's first use (Serve's proxy, gRPC's buffers) lies before the
        # start of the memory measurement, and only what grows with the load counts
        tour = soak.every_path()
        for kind, variant, send in tour:
            await _send(soak, tally, kind, variant, send, t0)
        num_warmup_requests = num_warmup + len(tour)
        mem_start = await asyncio.to_thread(sample_memory, title_of, gcs_port)
        mem_max, num_samples = total_mib(mem_start), 1
        load_start = time.monotonic()
        deadline = load_start + duration_s

        async def worker(i: int) -> None:
            rng = random.Random(f"{seed}:{i}")
            while time.monotonic() < deadline:
                kind, variant, send = soak.draw(rng)
                await _send(soak, tally, kind, variant, send, t0)

        async def sampler() -> None:
            nonlocal mem_max, num_samples
            while True:
                await asyncio.sleep(sample_every_s)
                now = total_mib(await asyncio.to_thread(sample_memory, title_of, gcs_port))
                mem_max, num_samples = max(mem_max, now), num_samples + 1
                if progress is not None:
                    progress({"elapsed_s": round(time.monotonic() - load_start, 1), "duration_s": duration_s,
                              "requests": sum(sum(tally.outcomes(k).values()) for k in tally.requests),
                              "errors": tally.num_errors, "rss_mib": round(now, 1)})

        sampling = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        finally:
            sampling.cancel()
        load_s = time.monotonic() - load_start
        cache, health, drain_s = await soak.wait_idle(idle_timeout_s)
        mem_end = await asyncio.to_thread(sample_memory, title_of, gcs_port)
        mem_max, num_samples = max(mem_max, total_mib(mem_end)), num_samples + 1
    finally:
        await soak.close()

    memory = memory_report(mem_start, mem_end, mem_max, num_samples, memory_bound_mib)
    memory["available"] = bool(mem_start)
    memory["scope"] = (f"the Ray cluster with its GCS on port {gcs_port}" if gcs_port is not None
                       else "every Ray process on this machine")
    if not mem_start:
        memory["note"] = "no matching process on this machine: memory was not measured (is the server elsewhere?)"
    report = {
        "duration_s": round(load_s, 1), "concurrency": concurrency, "seed": seed,
        "num_warmup": num_warmup_requests,
        "model": model, "max_model_len": soak.max_model_len, "max_body_bytes": max_body_bytes,
        "bad_cases": sorted(soak.bad),
        "num_requests": sum(sum(tally.outcomes(k).values()) for k in tally.requests),
        "requests_by_kind": {k: tally.outcomes(k) for k in tally.requests},
        "requests": tally.requests, "latency": tally.latency_report(),
        "num_overload_retries": tally.num_overload_retries,
        "num_errors": tally.num_errors, "errors": tally.errors,
        "memory": memory, "cache_at_end": cache, "health_at_end": health, "drain_s": round(drain_s, 2),
    }
    report["failures"] = verdict(report)
    report["passed"] = not report["failures"]
    return report
