"""What Ray Serve's gRPC proxy registers for ``latentmoe.v1.Generator`` (``grpc_servicer_functions``).

It runs in the proxy process, not in a replica. It registers the service's methods, and it does two
things the generated ``add_GeneratorServicer_to_server`` does not.

A request message that does not parse reaches the replica as a ``MalformedRequest``, which answers
INVALID_ARGUMENT and says why. With the generated deserializer, gRPC itself would answer INTERNAL.

It also mends one thing in Ray Serve 2.60's proxy. When a client cancels a ``GenerateStream`` while the proxy is
writing a message to it, rather than waiting on the replica for the next one, the proxy never
cancels the replica call: the request would run on until ``max_tokens`` and hold its cache blocks.

The mend does as little as it can inside the proxy. It starts no task and makes no await, and it
reads the gRPC context only while the call is live. Each stream gets a request id here when the client
sent none. When the proxy's stream is closed before its end, the id is handed to a thread. The thread
asks the ingress replicas to abort the request, and they pass that on to their router. When the proxy
did cancel the replica call, that abort is a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
from google.protobuf.message import DecodeError

from latentmoe.actors.names import INGRESS_DEPLOYMENT
from latentmoe.proto import generate_pb2 as pb

logger = logging.getLogger(__name__)

_APPS_TTL_S = 10.0
_apps: tuple[float, list[str]] = (0.0, [])
_handles: dict = {}
_lock = threading.Lock()


def _ingress_apps(app: str | None) -> list[str]:
    """The application the stream was for (its ``application`` metadata), else every application that runs the
    ingress deployment (looked up every 10 s at most)."""
    global _apps
    if app:
        return [app]
    from ray import serve

    with _lock:
        looked_up, names = _apps
        if time.monotonic() - looked_up > _APPS_TTL_S:
            names = [name for name, status in serve.status().applications.items()
                     if INGRESS_DEPLOYMENT in status.deployments]
            _apps = (time.monotonic(), names)
        return names


def _abort(request_id: str, app: str | None) -> None:
    """Ask the ingress replicas to abort a request (they pass it on to their router).

    Through Serve's deployment handle, not the router's actor handle: deserializing an actor handle makes
    Ray import the actor's class, and the router's module imports the engine (torch, ~250 MiB) into the
    proxy.
    """
    from ray import serve

    try:
        for name in _ingress_apps(app):
            with _lock:
                handle = _handles.get(name)
                if handle is None:
                    handle = _handles[name] = serve.get_deployment_handle(INGRESS_DEPLOYMENT, name)
            handle.abort_request.remote(request_id).result(timeout_s=30)  # unknown ids are a no-op
    except Exception as e:  # noqa: BLE001: a failed abort must not take the proxy down; the request ends anyway
        logger.warning("could not abort cancelled stream %s: %r", request_id, e)


class MalformedRequest:
    """A request message that did not parse (it travels to the replica in its place)."""

    def __init__(self, message_type: str, size: int, error: str):
        self.message_type, self.size, self.error = message_type, size, error

    def __str__(self) -> str:
        return f"the request is not a valid {self.message_type} message ({self.size} bytes): {self.error}"


def _tolerant(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, len(data), str(e) or "it does not parse")

    return parse


def _method_handlers(servicer) -> dict:
    """``latentmoe.v1.Generator``'s methods, as in the generated code but with tolerant request parsing."""
    def handler(kind, method, request_class, response_class):
        return kind(method, request_deserializer=_tolerant(request_class),
                    response_serializer=response_class.SerializeToString)

    return {
        "Generate": handler(grpc.unary_unary_rpc_method_handler, servicer.Generate, pb.GenerateRequest,
                            pb.GenerateResponse),
        "GenerateStream": handler(grpc.unary_stream_rpc_method_handler, servicer.GenerateStream,
                                  pb.GenerateRequest, pb.GenerateResponse),
        "GetExpertLoad": handler(grpc.unary_unary_rpc_method_handler, servicer.GetExpertLoad,
                                 pb.ExpertLoadRequest, pb.ExpertLoadResponse),
    }


def _register(servicer, server) -> None:
    handlers = _method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)


SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name


def abort_when_closed_early(handler):
    """Wrap the proxy's ``GenerateStream`` handler (an async generator function)."""

    async def stream(request, context):
        if not isinstance(request, pb.GenerateRequest):  # malformed: the replica refuses it, nothing to abort
            async for message in handler(request, context):
                yield message
            return
        if not request.request_id:
            request.request_id = f"grpc-{uuid.uuid4().hex}"
        request_id, finished = request.request_id, False
        app = dict(context.invocation_metadata() or ()).get("application")  # read while the call is live
        try:
            async for message in handler(request, context):
                yield message
            finished = True
        finally:
            if not finished:
                threading.Thread(target=_abort, args=(request_id, app), daemon=True,
                                 name="latentmoe-abort").start()

    return stream


def add_generator_servicer(servicer, server) -> None:
    """``grpc_servicer_functions`` entry for ``latentmoe.v1.Generator``."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:  # not Serve's proxy server (or a Ray that changed it): a plain registration
        _register(servicer, server)
        return

    def patched(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if service_method.endswith("/GenerateStream") and getattr(streaming_type, "name", "") == "UNARY_STREAM":
            return abort_when_closed_early(handler)
        return handler

    server.service_handler_factory = patched
    try:
        _register(servicer, server)
    finally:
        server.service_handler_factory = factory
