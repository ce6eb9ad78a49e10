"""The ingress's engine client: a request goes to an attention shard and its outputs come back.

``ShardClient`` validates a prompt (tokenized and checked here, so a bad one never reaches a shard),
opens a stream to an attention shard (through a Serve handle, which routes by load, or to plain actors
for the offline ``LLM``), and follows it. When the shard goes away mid-stream (it died, or drained and
left), the request moves to another shard with the tokens its client already has, which are recomputed
there; the client sees one unbroken stream. Per-request metrics (TTFT, inter-token, end-to-end, how
requests ended) are counted here, where the client's view is. The coordinator answers health, cache and
expert-load questions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from typing import AsyncIterator, Callable

import ray

from latentmoe.actors.attention_shard import OverloadedError, ShardGoneError
from latentmoe.actors.outputs import Inbox
from latentmoe.cluster.telemetry import RequestTimes
from latentmoe.engine.engine import RequestOutput, tokenize_prompt
from latentmoe.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class NoShardError(RuntimeError):
    """No attention shard could take the request (none is up, or they kept failing): 503 / UNAVAILABLE."""


class OutputTimeoutError(RuntimeError):
    """No output came within the output timeout (a shard hangs, or a recovery outlasted it): 503."""


def unwrap(e: BaseException) -> BaseException:
    if isinstance(e, ray.exceptions.RayTaskError):
        return e.as_instanceof_cause()
    return e


def _shard_gone(e: BaseException) -> bool:
    return isinstance(e, (ShardGoneError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class ShardClient:
    def __init__(self, open_stream: Callable[..., AsyncIterator[RequestOutput]], coordinator, tokenizer, info: dict,
                 *, output_timeout_s: float = 300.0, recovery_timeout_s: float = 300.0, metrics=None):
        """``open_stream(request_id, prompt_token_ids, params, output_token_ids, num_output_chars, moved, ticket)``:
        the call running one request on some attention shard (``moved``: its last one went away), an async
        iterator that ends when the shard has sent the request's last output to ``ticket``'s inbox (this
        client's) and raises if the request fails there."""
        self.open_stream, self.coordinator, self.tokenizer = open_stream, coordinator, tokenizer
        self.vocab_size, self.max_model_len = info["vocab_size"], info["max_model_len"]
        self.output_timeout_s, self.recovery_timeout_s = output_timeout_s, recovery_timeout_s
        self.metrics = metrics
        self.num_moves = 0
        self._streams: dict[str, object] = {}  # request id -> the stream it is on now (for aborts)
        self._aborted: set[str] = set()
        # the coordinator's last word on the group, polled in the background (never on a request's path): with
        # no attention shard up, new requests get 503 at once instead of waiting in Serve's queue
        self.last_status: tuple[float, dict] | None = None
        self._poller: asyncio.Task | None = None
        self.ids = itertools.count()
        self._inbox: Inbox | None = None
        self._ending: set[asyncio.Task] = set()  # calls of finished requests, left to end by themselves

    @property
    def inbox(self) -> Inbox:
        """Where the attention shards send this client's outputs (made on first use, on this node's address)."""
        if self._inbox is None:
            self._inbox = Inbox(ray.util.get_node_ip_address())
        return self._inbox

    def close(self) -> None:
        if self._inbox is not None:
            self._inbox.close()

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.inc(tags={"status": status})

    def validate(self, prompt, params: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = tokenize_prompt(self.tokenizer, self.vocab_size, self.max_model_len, prompt)
        params.check_vocab(self.vocab_size)
        return ids, params

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has ``finished``. Bad input raises ``ValueError`` before
        anything is yielded; a caller that stops iterating aborts the request (its stream is cancelled)."""
        try:
            ids, params = self.validate(prompt, params)
        except (ValueError, TypeError):
            self._count("invalid")
            raise
        self._start_polling()
        if self._no_attention():
            self._count("error")
            raise NoShardError("no attention shard is up")
        request_id = request_id or f"r-{next(self.ids)}"
        times = RequestTimes(time.monotonic())
        tokens: list[int] = []
        chars, moves, status = 0, 0, "abort"
        gone_since: float | None = None
        last: RequestOutput | None = None
        try:
            while True:
                inbox = self.inbox
                route = inbox.open(request_id, moves)
                stream = self.open_stream(request_id, ids, params, tokens, chars, moves > 0, inbox.ticket(moves))
                self._streams[request_id] = stream
                call = asyncio.get_running_loop().create_task(_follow(stream, route))
                call_ended, done = False, False
                try:
                    while True:
                        # once the call has ended, its last output was sent: it comes at once, or something broke
                        timeout = min(self.output_timeout_s, LAST_OUTPUT_TIMEOUT_S) if call_ended else \
                            self.output_timeout_s
                        try:
                            item = await asyncio.wait_for(route.get(), timeout)
                        except asyncio.TimeoutError:
                            if call_ended:
                                raise ShardGoneError("the attention shard ended the request, but its last "
                                                     f"outputs did not arrive within {timeout:g} s") from None
                            if gone_since is not None:  # waiting for a shard to take it over
                                raise NoShardError(f"no attention shard took the request within "
                                                   f"{self.output_timeout_s:g} s") from None
                            raise OutputTimeoutError(f"no output within {self.output_timeout_s:g} s") from None
                        if item is _CALL_ENDED:
                            call_ended = True
                            continue
                        if isinstance(item, BaseException):
                            raise item
                        out = item
                        gone_since, last = None, out
                        self._observe(times, out)
                        if params.num_samples == 1:
                            tokens, chars = list(out.token_ids), len(out.text)
                        yield out
                        if out.finished:
                            status, done = out.finish_reason or "stop", True
                            return
                except BaseException as raised:
                    e = unwrap(raised)
                    if request_id in self._aborted and not isinstance(raised, GeneratorExit):
                        status = "abort"  # abort(): the shard dropped it when its stream was cancelled
                        yield _aborted_output(request_id, ids, params, last)
                        return
                    if not _shard_gone(e):
                        status = ("overloaded" if isinstance(e, OverloadedError) or _backpressure(e) else
                                  "invalid" if isinstance(e, (ValueError, TypeError)) else
                                  "abort" if isinstance(e, (asyncio.CancelledError, GeneratorExit)) else "error")
                        if e is raised:
                            raise
                        raise e from None
                    gone_since = gone_since or time.monotonic()
                    if params.num_samples > 1 and tokens:
                        status = "error"
                        raise NoShardError("the attention shard of this request (n > 1) failed") from None
                    if time.monotonic() - gone_since > self.recovery_timeout_s:
                        status = "error"
                        raise NoShardError(f"no attention shard took the request within "
                                           f"{self.recovery_timeout_s:g} s: {e}") from None
                    moves += 1
                    self.num_moves += 1
                    if self.metrics is not None:
                        self.metrics.moved.inc()
                    logger.warning("request %s: its attention shard went away (%s); moving it (%d tokens kept)",
                                   request_id, e, len(tokens))
                    await asyncio.sleep(min(2.0, 0.1 * moves))
                finally:
                    inbox.close_route(request_id, route)
                    if done:  # the call ends by itself in a moment: closing it now would abort a finished request
                        self._ending.add(call)
                        call.add_done_callback(self._ending.discard)
                    else:
                        call.cancel()
                        await _close(stream)
        finally:
            self._streams.pop(request_id, None)
            self._aborted.discard(request_id)
            self._count(status)
            if self.metrics is not None:
                self.metrics.e2e.observe(time.monotonic() - times.arrival)

    async def abort(self, request_id: str) -> bool:
        """Abort a running request: its stream to the shard is cancelled (the shard frees its blocks), and its
        caller gets a last output with ``finish_reason`` "abort". False if it is not running here."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        self._aborted.add(request_id)
        _cancel(stream)
        return True

    def _start_polling(self) -> None:
        if (self._poller is None or self._poller.done()) and self.coordinator is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self, period_s: float = 2.0) -> None:
        while True:
            try:
                self.last_status = (time.monotonic(), await self.status())
            except Exception:  # noqa: BLE001: the coordinator restarts or hangs; requests go on without it
                pass
            await asyncio.sleep(period_s)

    def _no_attention(self, fresh_s: float = 10.0) -> bool:
        if self.last_status is None:
            return False
        when, status = self.last_status
        return time.monotonic() - when < fresh_s and not status["attention_shards"]

    def _observe(self, times: RequestTimes, out: RequestOutput) -> None:
        if self.metrics is None:
            return
        ttft, itl = times.on_output(time.monotonic(), len(out.delta_token_ids))
        if ttft is not None:
            self.metrics.ttft.observe(ttft)
        if itl is not None:
            self.metrics.itl.observe(itl)
        if out.delta_token_ids:
            self.metrics.generation_tokens.inc(len(out.delta_token_ids))
        if out.finished:
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))

    async def generate_all(self, prompts: list, params: list[SamplingParams | None]) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts. Nothing runs if one is bad."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        for p, sp in zip(prompts, params):
            self.validate(p, sp)

        async def run(prompt, sp):
            final = None
            async for out in self.generate(prompt, sp):
                final = out
            return final

        return list(await asyncio.gather(*(run(p, sp) for p, sp in zip(prompts, params))))

    # ---- the coordinator's side ----------------------------------------------------------------------------

    async def status(self) -> dict:
        return await asyncio.wait_for(self.coordinator.status.remote(), 10)

    async def expert_load(self, window_s: float) -> dict:
        return await asyncio.wait_for(self.coordinator.expert_load.remote(window_s), 30)

    async def cache_stats(self) -> dict:
        """Summed over the attention shards, from their last reports to the coordinator (about once a second)."""
        status = await asyncio.wait_for(self.coordinator.shards.remote(), 30)
        shards = [info.get("cache", {}) for _, info in status["attention"] if info.get("cache")]
        first = shards[0] if shards else {}
        return {"block_size": first.get("block_size"), "bytes_per_token": first.get("bytes_per_token"),
                "num_blocks": sum(s["num_blocks"] for s in shards),
                "num_free_blocks": sum(s["num_free_blocks"] for s in shards),
                "num_running": sum(s.get("num_running", 0) for s in shards),
                "num_waiting": sum(s.get("num_waiting", 0) for s in shards), "shards": shards}


LAST_OUTPUT_TIMEOUT_S = 30.0
_CALL_ENDED = object()  # a request's call ended without error: its last output has been sent


async def _follow(stream, route: asyncio.Queue) -> None:
    """Follow a request's call; its end (``_CALL_ENDED``) or its error goes to the request's route, in line
    with the outputs."""
    try:
        async for _ in stream:  # a call with a ticket yields nothing
            pass
    except asyncio.CancelledError as e:
        if asyncio.current_task().cancelling():  # the request is done with this call
            raise
        route.put_nowait(e)  # the call was cancelled under us (abort())
        return
    except BaseException as e:  # noqa: BLE001: the shard's error, raised where the request is followed
        route.put_nowait(e)
        return
    route.put_nowait(_CALL_ENDED)


def _backpressure(e: BaseException) -> bool:
    try:
        from ray.serve.exceptions import BackPressureError
    except ImportError:  # no Serve: the offline LLM
        return False
    return isinstance(e, BackPressureError)


def _aborted_output(request_id: str, ids: list[int], params: SamplingParams,
                    last: RequestOutput | None) -> RequestOutput:
    from latentmoe.engine.engine import CompletionOutput

    if last is None:
        samples = [CompletionOutput(i, [], "") for i in range(params.n)]
    else:
        samples = last.outputs
    samples = [dataclasses.replace(o, delta_token_ids=[], delta_text="", delta_logprobs=None, finished=True,
                                   finish_reason=o.finish_reason if o.finished else "abort") for o in samples]
    return RequestOutput(request_id, ids, samples, finished=True)


def _cancel(stream) -> None:
    try:
        stream.cancel()
    except Exception as e:  # noqa: BLE001: cancelling a stream that ended
        logger.debug("cancelling a stream: %r", e)


async def _close(stream) -> None:
    try:
        if hasattr(stream, "aclose"):
            await stream.aclose()
        elif hasattr(stream, "cancel"):
            stream.cancel()
    except Exception as e:  # noqa: BLE001: closing a broken stream
        logger.debug("closing a stream: %r", e)


def serve_opener(handle):
    """Streams through a Serve handle to the attention deployment (Serve picks the replica by load, and stops
    picking one that died or drains)."""
    stream_handle = handle.options(stream=True)
    try:  # this ingress replica's own actor: the shard aborts its requests if it dies
        consumer = ray.get_runtime_context().current_actor
    except Exception:  # noqa: BLE001: not in an actor
        consumer = None

    def open_stream(request_id, ids, params, tokens, chars, moved=False, ticket=None):
        return stream_handle.generate.remote(request_id, ids, params, list(tokens), chars, consumer, ticket)

    return open_stream


def actor_opener(pick):
    """Streams to plain attention actors (the offline ``LLM``): ``await pick(moved)`` chooses the actor."""

    def open_stream(request_id, ids, params, tokens, chars, moved=False, ticket=None):
        return _ActorStream(pick, moved, (request_id, ids, params, list(tokens), chars), {"ticket": ticket})

    return open_stream


class _ActorStream:
    """One request's outputs from an attention actor, as Serve's response generator offers them."""

    def __init__(self, pick, moved: bool, args: tuple, kwargs: dict):
        self.pick, self.moved, self.args, self.kwargs = pick, moved, args, kwargs
        self.gen = None
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.gen is None:
            actor = await self.pick(self.moved)
            if self.cancelled:
                raise asyncio.CancelledError()
            self.gen = actor.generate.options(num_returns="streaming").remote(*self.args, **self.kwargs)
        ref = await self.gen.__anext__()
        return await ref

    def cancel(self) -> None:
        self.cancelled = True
        if self.gen is not None:
            ray.cancel(self.gen)

    async def aclose(self) -> None:
        self.cancel()


class InProcessClient:
    """The engine client over a single-process engine (``AsyncLLM``), with no Ray: the ingress runs on it in
    tests of the HTTP and gRPC layers, and anyone can put the front doors on one process."""

    def __init__(self, engine):
        """``engine``: an ``AsyncLLM``."""
        self.async_engine = engine
        self.vocab_size = engine.engine.model_config.vocab_size
        self.max_model_len = engine.engine.max_model_len
        self.num_moves = 0

    def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        return self.async_engine.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> bool:
        await self.async_engine.abort(request_id)
        return True

    async def status(self) -> dict:
        cache = self.async_engine.engine.cache_stats()
        error = repr(self.async_engine.error) if self.async_engine.error is not None else None
        return {"attention_shards": 1, "expert_shards": 0, "epoch": 0, "error": error,
                "num_running": cache.get("num_running", 0), "num_waiting": cache.get("num_waiting", 0),
                "num_scale_outs": 0, "num_scale_ins": 0, "num_recoveries": 0}

    async def cache_stats(self) -> dict:
        return self.async_engine.engine.cache_stats()

    async def expert_load(self, window_s: float) -> dict:
        raise NoShardError("expert load is measured on the disaggregated cluster only")
