"""The output channel between attention shards and their consumers (``latentmoe.actors.outputs``), without Ray:
real sockets on loopback, a real asyncio loop on the consumer side, the shard's sender threads on the other."""

import asyncio
import socket
import threading
from multiprocessing.connection import AuthenticationError, Client

import pytest

from latentmoe.actors.outputs import Inbox, Outbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def take(q: asyncio.Queue, n: int, timeout: float = 10.0) -> list:
    return [await asyncio.wait_for(q.get(), timeout) for _ in range(n)]


def test_each_request_gets_its_own_outputs_in_order_and_earlier_attempts_are_dropped():
    async def main():
        inbox = Inbox("127.0.0.1")
        outbox = Outbox()
        a, b = inbox.open("a", 0), inbox.open("b", 1)  # "b" has moved once: attempt 1
        sent = threading.Event()
        for step in range(20):  # one message per step, both requests' outputs in it
            batch = [("a", 0, ("a", step)), ("b", 0, ("stale b", step)), ("b", 1, ("b", step)), ("gone", 0, step)]
            outbox.send(inbox.address, inbox.authkey, batch, (lambda ok: sent.set()) if step == 19 else None)
        got_a, got_b = await take(a, 20), await take(b, 20)
        assert got_a == [("a", i) for i in range(20)]
        assert got_b == [("b", i) for i in range(20)]  # attempt 0's outputs never reached the route of attempt 1
        assert a.empty() and b.empty()
        assert await asyncio.to_thread(sent.wait, 10)
        assert inbox.num_messages == 20 and outbox.num_messages == 20
        inbox.close_route("a", a)
        outbox.send(inbox.address, inbox.authkey, [("a", 0, "late")])
        outbox.send(inbox.address, inbox.authkey, [("b", 1, "last")])
        assert await take(b, 1) == ["last"]  # sent after "late": by then "late" was read, and dropped
        assert a.empty()
        outbox.close()
        inbox.close()

    asyncio.run(main())


def test_a_peer_without_the_key_is_refused_and_the_inbox_goes_on():
    async def main():
        inbox = Inbox("127.0.0.1")
        q = inbox.open("r", 0)

        def intrude():
            with pytest.raises(AuthenticationError):
                Client(inbox.address, authkey=b"x" * 32)

        await asyncio.to_thread(intrude)
        outbox = Outbox()
        outbox.send(inbox.address, inbox.authkey, [("r", 0, "ok")])
        assert await take(q, 1) == ["ok"]
        assert inbox.num_messages == 1  # the intruder delivered nothing
        outbox.close()
        inbox.close()

    asyncio.run(main())


def test_an_unreachable_consumer_is_reported_and_later_sends_fail_at_once():
    address = ("127.0.0.1", free_port())  # nobody listens there
    unreachable, results = [], []
    done = threading.Event()
    outbox = Outbox(on_unreachable=unreachable.append)
    outbox.send(address, b"k" * 32, [("r", 0, "x")], results.append)
    outbox.send(address, b"k" * 32, [("r", 0, "y")], lambda ok: (results.append(ok), done.set()))
    assert done.wait(10)
    assert results == [False, False]
    assert unreachable == [address]  # once, for the first failure
    outbox.close()


def test_a_consumer_that_comes_back_is_reached_again():
    """After a failure the next message tries a fresh connection (a consumer restarted on the same address)."""
    from multiprocessing.connection import Listener

    address, key = ("127.0.0.1", free_port()), b"k" * 32
    failed = threading.Event()
    outbox = Outbox()
    outbox.send(address, key, [("r", 0, "lost")], lambda ok: failed.set())
    assert failed.wait(10)
    with Listener(address, authkey=key) as listener:
        outbox.send(address, key, [("r", 0, "again")])
        with listener.accept() as conn:
            assert conn.recv() == [("r", 0, "again")]
    outbox.close()
