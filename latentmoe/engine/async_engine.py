"""An asyncio front for an engine: submit a request, iterate its outputs as they come, abort it.

The engine steps on one background thread (torch releases the GIL, so the event loop
stays responsive). Adds and aborts are queued and applied by that thread between
steps, so the engine itself is only ever touched by one thread.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import AsyncIterator

from latentmoe.engine.engine import LLMEngine, RequestOutput
from latentmoe.engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._wakeup = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="latentmoe-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a ``RequestOutput`` per step that changed the request; the last has ``finished``.

        Bad input raises ``ValueError`` before anything is yielded. Cancelling the iteration (a client
        that went away) aborts the request and frees its cache blocks.
        """
        if self._stopped:
            raise RuntimeError("engine is shut down")
        request_id = request_id or f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()
        self._streams[request_id] = (loop, stream)
        self._command(("add", request_id, prompt, params, loop, added))
        finished = False
        try:
            await added  # raises the engine's ValueError for bad input
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._command(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._command(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------------------------

    def _command(self, cmd) -> None:
        self._commands.put(cmd)
        self._wakeup.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt, params, loop, added = cmd
                try:
                    self.engine.add_request(prompt, params, request_id=request_id)
                except Exception as e:  # bad input: tell that caller only
                    loop.call_soon_threadsafe(_set_exception, added, e)
                else:
                    loop.call_soon_threadsafe(_set_result, added, None)
            else:
                self.engine.abort_request(cmd[1])

    def _loop(self) -> None:
        while not self._stopped:
            self._apply_commands()
            if not self.engine.has_unfinished:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # a failed step fails the requests in it, never silently
                self.error = e
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed: {e!r}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
