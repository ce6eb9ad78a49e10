"""What Ray Serve's gRPC proxy registers for ``latentmoe.v1.Generator`` (``grpc_servicer_functions``).

It runs in the proxy process, not in a replica. It registers the generated servicer, and mends one
thing in the proxy (Ray 2.60): a client that cancels a server-streaming call while the proxy is
writing a message to it (rather than waiting on the replica for the next one) leaves the replica's
request running, because the proxy cancels the replica call only when the cancellation lands in
its wait on the replica. Here the proxy's stream is pumped by a task of its own, so the client's
cancellation always reaches that wait, and the replica (and so the engine) aborts the request.
Without this, a disconnected gRPC stream keeps its cache blocks until ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import logging

from latentmoe.proto import generate_pb2_grpc

logger = logging.getLogger(__name__)

_DONE = object()


def cancel_safe_stream(handler):
    """Wrap a unary-stream handler (an async generator function) so that cancelling the caller cancels
    the handler while it awaits, never while it is suspended at a ``yield``."""

    async def stream(request, context):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump():
            try:
                async for message in handler(request, context):
                    queue.put_nowait(message)
            except BaseException as e:  # noqa: BLE001: handed to the consumer, cancellation included
                queue.put_nowait(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
            else:
                queue.put_nowait(_DONE)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001: the cancellation we asked for
                    pass

    return stream


def add_generator_servicer(servicer, server) -> None:
    """``grpc_servicer_functions`` entry for ``latentmoe.v1.Generator``."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:  # not Serve's proxy server (or a Ray that changed it): register as generated
        generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
        return

    def patched(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if getattr(streaming_type, "name", "") == "UNARY_STREAM":
            return cancel_safe_stream(handler)
        return handler

    server.service_handler_factory = patched
    try:
        generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory
