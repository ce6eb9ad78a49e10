"""What Ray Serve's gRPC proxy registers for ``latentmoe.v1.Generator`` (``grpc_servicer_functions``).

It runs in the proxy process, not in a replica. It registers the generated servicer and mends one
thing in Ray Serve 2.60's proxy. When a client cancels a ``GenerateStream`` while the proxy is
writing a message to it, rather than waiting on the replica for the next one, the proxy never
cancels the replica call: the request would run on until ``max_tokens`` and hold its cache blocks.

The mend does as little as it can inside the proxy. It starts no task, makes no await and does not
touch the gRPC context. Each stream gets a request id here when the client sent none. When the proxy's
stream is closed before its end, the id is handed to a thread, which asks the router to abort it.
When the proxy did cancel the replica call, that abort is a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from latentmoe.proto import generate_pb2_grpc

logger = logging.getLogger(__name__)

_ROUTERS_TTL_S = 10.0
_routers: tuple[float, list] = (0.0, [])
_lock = threading.Lock()


def _router_handles() -> list:
    """The routers of this Ray cluster (named actors in the router namespace), looked up every 10 s at most."""
    global _routers
    import ray

    from latentmoe.actors.cluster import ROUTER_NAMESPACE

    with _lock:
        looked_up, handles = _routers
        if time.monotonic() - looked_up > _ROUTERS_TTL_S:
            handles = [ray.get_actor(a["name"], namespace=ROUTER_NAMESPACE)
                       for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == ROUTER_NAMESPACE]
            _routers = (time.monotonic(), handles)
        return handles


def _abort(request_id: str) -> None:
    try:
        for router in _router_handles():
            router.abort.remote(request_id)  # unknown ids are a no-op
    except Exception as e:  # noqa: BLE001: a failed abort must not take the proxy down; the request ends anyway
        logger.warning("could not abort cancelled stream %s: %r", request_id, e)


def abort_when_closed_early(handler):
    """Wrap the proxy's ``GenerateStream`` handler (an async generator function)."""

    async def stream(request, context):
        if not request.request_id:
            request.request_id = f"grpc-{uuid.uuid4().hex}"
        request_id, finished = request.request_id, False
        try:
            async for message in handler(request, context):
                yield message
            finished = True
        finally:
            if not finished:
                threading.Thread(target=_abort, args=(request_id,), daemon=True, name="latentmoe-abort").start()

    return stream


def add_generator_servicer(servicer, server) -> None:
    """``grpc_servicer_functions`` entry for ``latentmoe.v1.Generator``."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:  # not Serve's proxy server (or a Ray that changed it): register as generated
        generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
        return

    def patched(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if service_method.endswith("/GenerateStream") and getattr(streaming_type, "name", "") == "UNARY_STREAM":
            return abort_when_closed_early(handler)
        return handler

    server.service_handler_factory = patched
    try:
        generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory
