"""How a request's outputs come back from its attention shard: one message per step per consumer.

Carrying each token as a Ray streaming item costs a Ray object, its bookkeeping and an event-loop turn on
both sides, per token per hop: measured here, Ray streaming through one async actor peaks near 2.9k items/s,
and in the shard those turns take the GIL from the step loop. So the request itself goes to the shard as a
Ray call (through Serve's handle: routing, queue limits and autoscaling see it as one ongoing request), and
its outputs come back on a connection of their own: each consumer (an ingress replica, or the offline
``LLM``'s driver) listens on an ``Inbox``; each attention shard keeps one ``Outbox`` connection to every
consumer it serves and sends it, once per step, every output that step made for that consumer's requests.
vLLM's API server and engine core talk the same way (ZMQ), as do SGLang's tokenizer manager and scheduler.

The connection is ``multiprocessing.connection``'s: length-framed pickles after an HMAC challenge on a key of
32 random bytes that only travels inside Ray calls, so nothing that cannot make those calls can feed the
inbox a pickle. Outputs carry the request's ``attempt`` (how many times it has moved): an inbox drops those
of an earlier attempt, which a shard that failed or drained may still send after the request moved.

No Ray here: the shard and the consumer sides are plain threads and an asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ticket:
    """What a shard needs to deliver a request's outputs: the consumer's inbox and key, and the attempt."""

    address: tuple[str, int]
    authkey: bytes
    attempt: int = 0


class Inbox:
    """A consumer's end: a listener on ``host`` (its node's address), a thread per shard connected to it, and a
    route per request to the asyncio queue its stream reads (on that stream's event loop). Deliveries for a
    request not routed here (it ended, or moved on: another attempt) are dropped."""

    def __init__(self, host: str):
        self.authkey = secrets.token_bytes(32)
        self._listener = Listener((host, 0), authkey=self.authkey)
        self.address = self._listener.address
        # request id -> (attempt, loop, queue); written on the streams' loops, read by the connections' threads
        self._routes: dict[str, tuple[int, asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.num_messages = 0  # messages received (one per step per shard with outputs for this consumer)
        self._closed = False
        threading.Thread(target=self._accept, name="latentmoe-inbox", daemon=True).start()

    def ticket(self, attempt: int) -> Ticket:
        return Ticket(self.address, self.authkey, attempt)

    def open(self, request_id: str, attempt: int) -> asyncio.Queue:
        """Route ``request_id``'s outputs of ``attempt`` to a new queue on the running loop."""
        q: asyncio.Queue = asyncio.Queue()
        self._routes[request_id] = (attempt, asyncio.get_running_loop(), q)
        return q

    def close_route(self, request_id: str, q: asyncio.Queue) -> None:
        route = self._routes.get(request_id)
        if route is not None and route[2] is q:
            del self._routes[request_id]

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:  # closed
                return
            except Exception as e:  # noqa: BLE001: a peer without the key (AuthenticationError), or one that hung up
                logger.warning("latentmoe inbox %s: refused a connection: %r", self.address, e)
                continue
            threading.Thread(target=self._read, args=(conn,), name="latentmoe-inbox-conn", daemon=True).start()

    def _read(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    batch = conn.recv()
                except (EOFError, OSError):  # the shard closed it (left, or died): its Ray calls say why
                    return
                self.num_messages += 1
                by_loop: dict = {}
                for request_id, attempt, output in batch:
                    route = self._routes.get(request_id)
                    if route is not None and route[0] == attempt:
                        by_loop.setdefault(route[1], []).append((route[2], output))
                for loop, items in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_put_all, items)
                    except RuntimeError:  # that loop has closed: nobody reads these any more
                        pass


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


class Outbox:
    """A shard's end: ``send(address, authkey, batch, on_sent)`` queues one message for a consumer; a
    sender thread per consumer connects (once) and sends in order, so a slow consumer never holds up the step
    loop or the others. ``on_sent(ok)`` runs on that thread after the send (``ok`` False: the consumer is
    unreachable, and every later message to it fails at once)."""

    def __init__(self, on_unreachable: Callable[[tuple[str, int]], None] | None = None):
        self.on_unreachable = on_unreachable or (lambda address: None)
        self._senders: dict[tuple[str, int], _Sender] = {}
        self._lock = threading.Lock()
        self.num_messages = 0

    def send(self, address: tuple[str, int], authkey: bytes, batch: list,
             on_sent: Callable[[bool], None] | None = None) -> None:
        with self._lock:
            sender = self._senders.get(address)
            if sender is None or sender.dead:  # first word to this consumer, or a try again after it failed
                if sender is not None:
                    sender.queue.put(None)
                sender = self._senders[address] = _Sender(address, authkey, self.on_unreachable)
        self.num_messages += 1
        sender.queue.put((batch, on_sent))

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            sender.queue.put(None)


class _Sender:
    def __init__(self, address: tuple[str, int], authkey: bytes, on_unreachable):
        self.address, self.authkey, self.on_unreachable = address, authkey, on_unreachable
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.dead = False
        threading.Thread(target=self._run, name="latentmoe-outbox", daemon=True).start()

    def _run(self) -> None:
        conn = None
        while True:
            item = self.queue.get()
            if item is None:
                break
            batch, on_sent = item
            ok = not self.dead
            if ok:
                try:
                    if conn is None:
                        conn = Client(self.address, authkey=self.authkey)
                    conn.send(batch)
                except Exception as e:  # noqa: BLE001: the consumer died or is unreachable
                    logger.warning("latentmoe outbox: cannot deliver to %s: %r", self.address, e)
                    self.dead, ok = True, False
                    self.on_unreachable(self.address)
            if on_sent is not None:
                on_sent(ok)
        if conn is not None:
            conn.close()
