"""The lockstep step loop every shard runs on its own thread: no actor drives the steps.

Each step starts with one small collective that carries every member's work count, the newest epoch
it has been told of and the micro-batches it wants the step run as (the group runs the most anyone
wants). When the counts sum to zero, every member parks on its doorbell; a member that gets work rings
everyone's doorbell (a TCP connection to each, carrying the epoch and the number of the round it is
about to enter: control only, and only on the idle -> busy edge), and all step again. A parked member
enters a round only with work of its own, a ring for exactly that round, or word of a new group, so no
member ever waits alone in a collective (a late ring, for a round already run, is ignored). When any
member has been told of a newer epoch, every member switches to that group at this boundary (the
coordinator tells them all; each waits for its own word). A collective that fails (a peer died or
hung) ends the group: the member reports the fault and waits for the next group. The member itself is
a plain object with ``num_work()``, ``lanes_wanted()``, ``step(lanes)`` and ``connect(comm, group)``.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Callable, Protocol

from latentmoe.cluster.communicator import Communicator, make_communicator
from latentmoe.cluster.membership import Group

logger = logging.getLogger(__name__)


class Stepper(Protocol):
    def num_work(self) -> int: ...  # tokens (requests) it has to run; 0 for expert shards

    def lanes_wanted(self) -> int: ...  # micro-batches it would run the next step as (the group takes the most)

    def step(self, lanes: int) -> None: ...  # one lockstep step as ``lanes`` micro-batches (raises on a fault)

    def connect(self, comm: Communicator, group: Group) -> None: ...


_RING = struct.Struct("!qq")  # (epoch, round)


class Doorbell:
    """A TCP listener: a connection carrying ``(epoch, round)`` raises ``wanted`` to it and sets ``event``.
    ``ring`` connects to others' doorbells."""

    def __init__(self, host: str):
        self.event = threading.Event()
        self.wanted = (0, 0)  # the latest (epoch, round) some peer asked this member to enter
        self._wanted_lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(64)
        self.address = (host, self._sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._serve, name="latentmoe-doorbell", daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(2.0)
                data = b""
                while len(data) < _RING.size:
                    chunk = conn.recv(_RING.size - len(data))
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                data = b""
            finally:
                conn.close()
            if len(data) == _RING.size:
                with self._wanted_lock:
                    self.wanted = max(self.wanted, _RING.unpack(data))
            self.event.set()

    @staticmethod
    def ring(addresses, epoch: int, round_: int) -> None:
        message = _RING.pack(epoch, round_)
        for host, port in addresses:
            try:
                with socket.create_connection((host, port), timeout=2.0) as conn:
                    conn.sendall(message)
            except OSError:  # a dead peer: the collective that follows finds out and reports it
                pass

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class StepLoop:
    """Run ``stepper`` in lockstep with the group's other members, on a thread of its own."""

    def __init__(self, stepper: Stepper, member_id: str, doorbell: Doorbell, *, collective_timeout_s: float = 60.0,
                 on_joined: Callable[[int], None] | None = None,
                 on_fault: Callable[[int, str], None] | None = None, park_poll_s: float = 1.0):
        self.stepper, self.member_id, self.doorbell = stepper, member_id, doorbell
        self.collective_timeout_s = collective_timeout_s
        self.on_joined = on_joined or (lambda epoch: None)
        self.on_fault = on_fault or (lambda epoch, error: None)
        self.park_poll_s = park_poll_s
        self.group: Group | None = None  # in force
        self.comm: Communicator | None = None
        self._pending: Group | None = None  # told of, not yet switched to
        self._lock = threading.Lock()
        self._stopped = False
        self.parked = True
        self.round = 0  # count collectives run in this epoch: the same on every member (lockstep)
        self.num_steps = 0
        self.num_idle_rounds = 0  # count collectives that found no work anywhere
        self.num_wakeups = 0  # times this member rang the others
        self.num_faults = 0  # collectives (or joins) that failed here
        self.left = threading.Event()  # set when an assignment without this member took effect
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"latentmoe-step-{member_id}", daemon=True)
        self._thread.start()

    # ---- what the actor calls (any thread) ------------------------------------------------------------------

    def assign(self, group: Group) -> None:
        """The coordinator's word: switch to ``group`` at the next boundary (leave, if it has no rank for us)."""
        with self._lock:
            if group.epoch <= self.epoch:
                return  # the group in force (told again after a coordinator restart), or an older one
            if self._pending is None or group.epoch > self._pending.epoch:
                self._pending = group
        self.doorbell.event.set()

    def wake(self) -> None:
        """New work here: the loop wakes, and rings the others if the group was parked."""
        self.doorbell.event.set()

    def stop(self) -> None:
        self._stopped = True
        self.doorbell.event.set()
        self._thread.join(timeout=30)
        self._close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def epoch(self) -> int:
        return self.group.epoch if self.group is not None else 0

    # ---- the loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped:
                if self.comm is None:
                    self._wait_for_group(self.epoch + 1)
                    continue
                if self.parked:
                    self.doorbell.event.wait(self.park_poll_s)
                    self.doorbell.event.clear()  # what follows reads state that a later ring sets again
                    has_work = self.stepper.num_work() > 0
                    rung = self.doorbell.wanted >= (self.epoch, self.round)
                    if not (has_work or rung or self._pending is not None):
                        continue  # a wake-up with nothing to do (an abort of a finished request): stay parked
                    if has_work and not rung:
                        self.num_wakeups += 1
                        Doorbell.ring(self.group.peers_of(self.member_id), self.epoch, self.round)
                else:
                    self.doorbell.event.clear()
                self._one_round()
        except BaseException as e:  # noqa: BLE001: a bug must show in health checks, not vanish with the thread
            logger.exception("latentmoe step loop %s stopped", self.member_id)
            self.error = e

    def _one_round(self) -> None:
        pending = self._pending
        told = pending.epoch if pending is not None else 0
        try:
            rows = self.comm.all_gather_ints([self.stepper.num_work(), told, self.stepper.lanes_wanted()])  # [W, 3]
        except Exception as e:  # noqa: BLE001: a peer died or hung
            self._fault(e)
            return
        self.round += 1
        newest = max(r[1] for r in rows)
        if newest > self.epoch:  # someone was told of a new group: everyone switches now
            self._wait_for_group(newest)
            return
        if sum(r[0] for r in rows) == 0:
            self.parked = True
            self.num_idle_rounds += 1
            return
        self.parked = False
        try:
            self.stepper.step(max(1, max(r[2] for r in rows)))
        except Exception as e:  # noqa: BLE001
            self._fault(e)
            return
        self.num_steps += 1

    def _fault(self, error: BaseException) -> None:
        epoch = self.epoch
        self.num_faults += 1
        logger.warning("latentmoe %s: collective failed at epoch %d: %r", self.member_id, epoch, error)
        self._close()
        self.on_fault(epoch, repr(error))
        self.parked = True

    def _wait_for_group(self, epoch: int) -> None:
        """Wait until told of a group of at least ``epoch``, then join it (or leave, if it is not ours)."""
        while not self._stopped:
            pending = self._pending
            if pending is not None and pending.epoch >= epoch:
                break
            self.doorbell.event.wait(self.park_poll_s)
            self.doorbell.event.clear()
        else:
            return
        with self._lock:
            group, self._pending = self._pending, None
        self._close()
        rank = group.rank_of(self.member_id)
        if rank is None:
            if self.group is not None and self.group.rank_of(self.member_id) is not None:
                self.group = group  # we were a member and are not any more: we left
                self.left.set()
                self._stopped = True
            # else: a group formed before ours (we are not in it yet): wait for the next one
            return
        start = time.monotonic()
        try:
            comm = make_communicator(group.backend, rank, group.world_size, group.rendezvous,
                                     self.collective_timeout_s)
            self.stepper.connect(comm, group)
        except Exception as e:  # noqa: BLE001: a member that never came: the coordinator forms another group
            logger.warning("latentmoe %s: could not join epoch %d: %r", self.member_id, group.epoch, e)
            self.num_faults += 1
            self.group = group
            self.on_fault(group.epoch, repr(e))
            return
        self.comm, self.group, self.round = comm, group, 0
        self.parked = False  # one round at once, on every member: work may be waiting anywhere
        logger.info("latentmoe %s: joined epoch %d as rank %d of %d in %.2f s", self.member_id, group.epoch, rank,
                    group.world_size, time.monotonic() - start)
        self.on_joined(group.epoch)

    def _close(self) -> None:
        if self.comm is not None:
            comm, self.comm = self.comm, None
            try:
                comm.close()
            except Exception:  # noqa: BLE001: a group broken by a dead peer may not close cleanly
                pass
