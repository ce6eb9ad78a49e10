"""The lockstep step loop in real processes with a real gloo group and real doorbells (no Ray).

Three members, each a ``StepLoop`` over a small stepper whose step is one collective and one job done. Work
given to one member makes all three step the same number of times; then all park; a wake-up with nothing to
do (an abort of a finished request) leaves everyone parked instead of one member waiting alone in a collective.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time

import pytest

from latentmoe.cluster.communicator import free_port
from latentmoe.cluster.membership import ATTENTION, Group, Member

WORLD = 3


class Jobs:
    """A stepper: ``num_work`` jobs queued here; a step is one collective (as a MoE layer's exchange) and a job."""

    def __init__(self):
        self.jobs = 0
        self.comm = None

    def num_work(self) -> int:
        return self.jobs

    def connect(self, comm, group) -> None:
        self.comm = comm

    def lanes_wanted(self) -> int:
        return 1

    def step(self, lanes: int) -> None:
        assert lanes == 1
        self.comm.all_gather_ints([self.jobs])
        self.jobs = max(0, self.jobs - 1)


def member(rank: int, commands, replies) -> None:
    from latentmoe.cluster.step_loop import Doorbell, StepLoop

    bell = Doorbell("127.0.0.1")
    jobs = Jobs()
    replies.put(("bell", rank, bell.address))
    loop = None
    while True:
        cmd, arg = commands.get(timeout=120)
        if cmd == "group":
            loop = StepLoop(jobs, f"attention-{rank}", bell, collective_timeout_s=20, park_poll_s=0.2)
            loop.assign(arg)
        elif cmd == "work":
            jobs.jobs += arg
            loop.wake()
        elif cmd == "wake":
            loop.wake()
        elif cmd == "stats":
            replies.put(("stats", rank, {"steps": loop.num_steps, "idle": loop.num_idle_rounds, "round": loop.round,
                                         "parked": loop.parked, "epoch": loop.epoch, "error": repr(loop.error)}))
        elif cmd == "stop":
            loop.stop()
            return


@pytest.fixture(scope="module")
def members():
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(WORLD)]
    replies = ctx.Queue()
    procs = [ctx.Process(target=member, args=(r, commands[r], replies), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    bells = {}
    for _ in range(WORLD):
        _, rank, address = replies.get(timeout=60)
        bells[rank] = address
    group = Group(1, tuple(Member(f"attention-{r}", ATTENTION, doorbell=bells[r]) for r in range(WORLD)), "gloo",
                  f"tcp://127.0.0.1:{free_port()}")
    for q in commands:
        q.put(("group", group))
    yield commands, replies
    for q in commands:
        q.put(("stop", None))
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


def stats(commands, replies) -> list[dict]:
    for q in commands:
        q.put(("stats", None))
    got = {}
    while len(got) < WORLD:
        try:
            _, rank, s = replies.get(timeout=30)
        except queue.Empty:
            raise AssertionError("a member did not answer") from None
        got[rank] = s
    return [got[r] for r in range(WORLD)]


def settle(commands, replies, timeout=20, until=lambda s: True) -> list[dict]:
    """Stats once every member is parked in the same round (and ``until`` holds)."""
    deadline = time.time() + timeout
    while True:
        s = stats(commands, replies)
        if all(m["parked"] and m["epoch"] == 1 for m in s) and len({m["round"] for m in s}) == 1 and until(s):
            return s
        assert time.time() < deadline, s
        time.sleep(0.2)


def test_work_on_one_member_steps_all_in_lockstep_then_all_park(members):
    commands, replies = members
    before = settle(commands, replies)
    assert all(m["epoch"] == 1 for m in before), before
    commands[2].put(("work", 5))
    after = settle(commands, replies, until=lambda s: s[2]["steps"] > before[2]["steps"])
    assert [m["steps"] - b["steps"] for m, b in zip(after, before)] == [5] * WORLD, (before, after)
    assert all(m["error"] == "None" for m in after)


def test_a_wake_up_with_nothing_to_do_stays_parked(members):
    commands, replies = members
    before = settle(commands, replies)
    commands[1].put(("wake", None))  # e.g. the abort of a request that had finished
    time.sleep(1.0)
    during = settle(commands, replies)
    assert [m["round"] for m in during] == [m["round"] for m in before], (before, during)
    commands[1].put(("work", 2))  # work on that member: it rings the others (it is not stuck in a collective)
    start = time.monotonic()
    after = settle(commands, replies, until=lambda s: s[1]["steps"] > during[1]["steps"])
    assert [m["steps"] - b["steps"] for m, b in zip(after, during)] == [2] * WORLD
    assert time.monotonic() - start < 10
