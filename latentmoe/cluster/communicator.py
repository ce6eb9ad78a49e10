"""One interface for the step's collectives: counts exchange and all-to-all with uneven splits.

Backends: point to point over TCP sockets (CPU tensors, the default there), ``torch.distributed``
with gloo (CPU tensors) and NCCL through CuPy's bindings (GPU tensors: group start, a send and a
recv per peer, group end). The group is formed
once at start-up from an address or a unique id that the router hands to every shard
through the control plane; tensors of a step never go through Ray.

Every communicator counts the bytes it moved, per peer rank, for its last call and since it
was made (``last_traffic``, ``traffic``): the sizes of what it handed its backend, not what a
caller planned. Rows a rank keeps for itself never leave it and are not counted.
"""

from __future__ import annotations

import collections
import datetime
import os
import random
import selectors
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class Traffic:
    """Bytes an all-to-all moved between this rank and each rank of the group (0 for this rank itself)."""

    sent: list[int]  # [W] bytes sent to each rank
    received: list[int]  # [W] bytes received from each rank

    @classmethod
    def zero(cls, world_size: int) -> "Traffic":
        return cls([0] * world_size, [0] * world_size)

    @property
    def num_bytes_sent(self) -> int:
        return sum(self.sent)

    @property
    def num_bytes_received(self) -> int:
        return sum(self.received)

    @property
    def num_bytes(self) -> int:
        """Sent and received together."""
        return self.num_bytes_sent + self.num_bytes_received

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic([a + b for a, b in zip(self.sent, other.sent)],
                       [a + b for a, b in zip(self.received, other.received)])


@dataclass(frozen=True)
class PeerTransfer:
    """One point-to-point operation of an all-to-all: ``count`` elements at ``offset`` (elements) of a buffer."""

    peer: int
    offset: int
    count: int


def peer_transfers(splits: list[int], row_numel: int) -> list[PeerTransfer]:
    """The send (or recv) per peer that an all-to-all of rows grouped by rank hands a point-to-point backend.

    ``splits[r]`` rows of ``row_numel`` elements each go to (come from) rank r, in rank order in one buffer.
    Peers with no rows get no operation.
    """
    transfers, offset = [], 0
    for peer, rows in enumerate(splits):
        assert rows >= 0, f"negative split {rows} for rank {peer}: {splits}"
        if rows:
            transfers.append(PeerTransfer(peer, offset * row_numel, rows * row_numel))
        offset += rows
    return transfers


def transfer_traffic(rank: int, world_size: int, sends: list[PeerTransfer], recvs: list[PeerTransfer],
                     element_size: int) -> Traffic:
    """The bytes that ``sends`` and ``recvs`` move to and from other ranks (a rank's own rows stay put)."""
    traffic = Traffic.zero(world_size)
    for t in sends:
        if t.peer != rank:
            traffic.sent[t.peer] += t.count * element_size
    for t in recvs:
        if t.peer != rank:
            traffic.received[t.peer] += t.count * element_size
    return traffic


def keep_own_rows(rank: int, sends: list[PeerTransfer], recvs: list[PeerTransfer], flat_send: torch.Tensor,
                  flat_out: torch.Tensor) -> None:
    """A point-to-point backend's rows for its own rank: copied from ``flat_send`` into their place in
    ``flat_out`` (they never leave the rank)."""
    own = [t for t in recvs if t.peer == rank]
    for t in sends:
        if t.peer == rank:
            assert own and own[0].count == t.count, f"rank {rank} sends itself {t.count} elements"
            flat_out[own[0].offset : own[0].offset + t.count] = flat_send[t.offset : t.offset + t.count]


class Communicator(ABC):
    rank: int
    world_size: int
    device: torch.device

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows ``send[sum(send_splits[:r]) : ...]`` go to rank r; returns the rows received, in rank order."""
        W = self.world_size
        assert len(send_splits) == len(recv_splits) == W, f"splits {send_splits} / {recv_splits} for {W} ranks"
        assert send.shape[0] == sum(send_splits), f"{send.shape[0]} rows to send, splits {send_splits}"
        out, traffic = self._all_to_all(send.contiguous(), send_splits, recv_splits)
        self.last_traffic = traffic
        self.traffic = self.traffic + traffic
        return out

    @abstractmethod
    def _all_to_all(self, send: torch.Tensor, send_splits: list[int],
                    recv_splits: list[int]) -> tuple[torch.Tensor, Traffic]:
        """The backend's exchange of a contiguous ``send``; returns the rows received and the bytes it moved."""

    def _start_counting(self) -> None:
        self.traffic = Traffic.zero(self.world_size)  # since the communicator was made
        self.last_traffic = Traffic.zero(self.world_size)  # of the last all_to_all (exchange_counts included)

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """What every rank will send to this one (the split sizes, exchanged before the payload)."""
        assert len(send_counts) == self.world_size, f"{len(send_counts)} counts for {self.world_size} ranks"
        ones = [1] * self.world_size
        recv = self.all_to_all(torch.tensor(send_counts, dtype=torch.long, device=self.device)[:, None], ones, ones)
        return recv.flatten().tolist()

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank), in rank order: the step loop's small
        collective at the start of each step (work counts, epochs)."""
        W, ones = self.world_size, [1] * self.world_size
        row = torch.tensor(values, dtype=torch.long, device=self.device)
        return self.all_to_all(row[None].expand(W, -1), ones, ones).tolist()

    def lane(self) -> "Communicator":
        """A second channel over the same ranks, independent of this one (its collectives match only its own):
        what a second micro-batch's exchanges run on, while the first one's are in flight. Every rank calls it
        at the same point. ``NotImplementedError`` where the backend has none."""
        raise NotImplementedError(f"{type(self).__name__} has no second lane")

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


# Ports picked now for something to listen on later (a rendezvous, a server a test or benchmark starts) come from
# below Linux's ephemeral range (32768-60999), which bind(0) and every outgoing connection draw from: a port free
# when picked was sometimes taken by the time its server bound it. Ray's workers take 10002-19999, the local
# clusters' own ranges 20000-24999 (``latentmoe.actors.local_cluster``), Serve's direct ingress 30000 up.
LISTEN_PORTS = range(25000, 30000)
_handed_out: collections.deque[int] = collections.deque(maxlen=1024)  # the latest, not handed out again


def free_port() -> int:
    """A port of ``LISTEN_PORTS`` that nothing is bound to now and that is not among the last 1024 this process
    handed out (a caller binds it later); each process walks the range from a random place (two processes rarely
    meet)."""
    start = random.randrange(len(LISTEN_PORTS))
    recent = set(_handed_out)
    for i in range(len(LISTEN_PORTS)):
        port = LISTEN_PORTS[(start + i) % len(LISTEN_PORTS)]
        if port in recent:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _handed_out.append(port)
        return port
    raise RuntimeError(f"no free port left in {LISTEN_PORTS.start}-{LISTEN_PORTS.stop - 1}")


def _row_numel(t: torch.Tensor) -> int:
    return t.shape[1:].numel()  # 1 for a 1-D tensor


class GlooCommunicator(Communicator):
    """``torch.distributed`` gloo process group; ``init_method`` is ``tcp://host:port`` of rank 0."""

    device = torch.device("cpu")

    def __init__(self, rank: int, world_size: int, init_method: str, timeout_s: float = 60.0):
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        self._dist = dist
        self._start_counting()
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self._group = None  # the default process group
        self._timeout_s = timeout_s

    def lane(self) -> "GlooCommunicator":
        """A gloo process group of its own over the same ranks (``new_group`` is collective)."""
        other = object.__new__(GlooCommunicator)
        other.rank, other.world_size, other._dist, other._timeout_s = (self.rank, self.world_size, self._dist,
                                                                        self._timeout_s)
        other._start_counting()
        other._group = self._dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self._timeout_s))
        return other

    def _all_to_all(self, send, send_splits, recv_splits):
        """Point to point, a send and a recv per peer with rows either way (as NCCL's): a pair with nothing to
        exchange does not talk. gloo's own ``all_to_all_single`` joins every pair in every call; with an attention
        shard and two expert shards on two cores it took 1.45 ms per call where a send there and back took 0.78
        (``benchmarks/bench_cluster.py``'s figures are the shards' own)."""
        out = torch.empty((sum(recv_splits), *send.shape[1:]), dtype=send.dtype)
        row = _row_numel(send)
        sends, recvs = peer_transfers(send_splits, row), peer_transfers(recv_splits, row)
        flat_send, flat_out = send.view(-1), out.view(-1)
        works = [self._dist.irecv(flat_out[t.offset : t.offset + t.count], t.peer, group=self._group)
                 for t in recvs if t.peer != self.rank]
        for t in sends:
            if t.peer != self.rank:
                works.append(self._dist.isend(flat_send[t.offset : t.offset + t.count], t.peer, group=self._group))
        keep_own_rows(self.rank, sends, recvs, flat_send, flat_out)
        timeout = datetime.timedelta(seconds=self._timeout_s)
        for work in works:
            work.wait(timeout)
        return out, transfer_traffic(self.rank, self.world_size, sends, recvs, send.element_size())

    def barrier(self):
        self._dist.barrier(group=self._group)

    def close(self):
        if self._group is None and self._dist.is_initialized():  # the default group: every lane goes with it
            self._dist.destroy_process_group()


class TcpCommunicator(Communicator):
    """Point to point over TCP, for CPU tensors: one connection per pair of ranks (per lane), each message a
    length-framed copy of the rows. ``init_method`` is ``tcp://host:port`` of rank 0, where a
    ``torch.distributed.TCPStore`` holds each rank's listening address while the connections form.

    gloo moves the same bytes through a device thread of its own and a work object per operation. An
    exchange of 33 KB there and back between two processes on this 2-core machine took 189 us over gloo
    and 20 us over a plain socket (an ad hoc ping-pong, 300 rounds); a decode step makes two such exchanges
    per MoE layer per expert shard. Sends and receives of one call go through one selector, so two ranks
    that send each other more than the sockets buffer do not deadlock. A peer that dies closes its
    connections (ConnectionError here); one that hangs runs into ``timeout_s`` (TimeoutError).
    """

    device = torch.device("cpu")
    _HEADER = 8  # bytes: the payload's length

    def __init__(self, rank: int, world_size: int, init_method: str, timeout_s: float = 60.0, *,
                 _store=None, _lane: int = 0):
        import torch.distributed as dist

        self.rank, self.world_size, self._timeout_s, self._lane = rank, world_size, timeout_s, _lane
        self._start_counting()
        host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
        self._init_method = init_method
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = _store or dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout,
                                              wait_for_workers=False)
        self._peers: dict[int, socket.socket] = {}
        try:
            with socket.create_server((_local_ip(host), 0)) as server:
                server.settimeout(timeout_s)
                ip, my_port = server.getsockname()[:2]
                self._store.set(f"lane{_lane}/{rank}", f"{ip}:{my_port}")
                for peer in range(rank):  # a rank dials the ranks below it and answers those above
                    peer_ip, peer_port = self._store.get(f"lane{_lane}/{peer}").decode().rsplit(":", 1)
                    conn = socket.create_connection((peer_ip, int(peer_port)), timeout=timeout_s)
                    conn.sendall(rank.to_bytes(8, "little"))
                    self._peers[peer] = conn
                for _ in range(rank + 1, world_size):
                    conn, _ = server.accept()
                    conn.settimeout(timeout_s)
                    peer = int.from_bytes(_recv_exactly(conn, 8), "little")
                    if not rank < peer < world_size or peer in self._peers:
                        conn.close()
                        raise ConnectionError(f"rank {rank}: a connection that says it is rank {peer} of {world_size}")
                    self._peers[peer] = conn
        except BaseException:
            self.close()  # the connections made so far
            raise
        for conn in self._peers.values():
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)

    def lane(self) -> "TcpCommunicator":
        """Connections of its own over the same ranks (every rank calls it at the same point)."""
        return TcpCommunicator(self.rank, self.world_size, self._init_method, self._timeout_s, _store=self._store,
                               _lane=self._lane + 1)

    def _all_to_all(self, send, send_splits, recv_splits):
        out = torch.empty((sum(recv_splits), *send.shape[1:]), dtype=send.dtype)
        row = _row_numel(send)
        sends, recvs = peer_transfers(send_splits, row), peer_transfers(recv_splits, row)
        elem = send.element_size()
        send_bytes = send.view(-1).view(torch.uint8).numpy() if send.numel() else None
        out_bytes = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else None
        writing: dict[socket.socket, list] = {}  # socket -> [memoryviews still to send]
        reading: dict[socket.socket, list] = {}  # socket -> [header buffer, got, payload view, got, peer]
        keep_own_rows(self.rank, sends, recvs, send.view(-1), out.view(-1))
        for t in sends:
            if t.peer != self.rank:
                data = memoryview(send_bytes[t.offset * elem : (t.offset + t.count) * elem])
                writing[self._peers[t.peer]] = [memoryview(len(data).to_bytes(8, "little")), data]
        for t in recvs:
            if t.peer != self.rank:
                view = out_bytes[t.offset * elem : (t.offset + t.count) * elem]
                reading[self._peers[t.peer]] = [bytearray(self._HEADER), 0, view, 0, t.peer]
        deadline = time.monotonic() + self._timeout_s
        with selectors.DefaultSelector() as sel:
            for conn in set(writing) | set(reading):
                sel.register(conn, (selectors.EVENT_WRITE if conn in writing else 0)
                             | (selectors.EVENT_READ if conn in reading else 0))
            while writing or reading:
                left = deadline - time.monotonic()
                if left <= 0:
                    waiting = sorted({s[4] for s in reading.values()} | {self._peer_of(c) for c in writing})
                    raise TimeoutError(f"rank {self.rank}: no exchange with ranks {waiting} in {self._timeout_s} s")
                for key, events in sel.select(left):
                    conn = key.fileobj
                    if events & selectors.EVENT_WRITE and conn in writing and self._write(conn, writing[conn]):
                        del writing[conn]
                    if events & selectors.EVENT_READ and conn in reading and self._read(conn, reading[conn]):
                        del reading[conn]
                    mask = ((selectors.EVENT_WRITE if conn in writing else 0)
                            | (selectors.EVENT_READ if conn in reading else 0))
                    if mask:
                        sel.modify(conn, mask)
                    else:
                        sel.unregister(conn)
        return out, transfer_traffic(self.rank, self.world_size, sends, recvs, elem)

    def _peer_of(self, conn: socket.socket) -> int:
        return next(peer for peer, c in self._peers.items() if c is conn)

    @staticmethod
    def _write(conn: socket.socket, chunks: list) -> bool:
        """Send what the socket takes now; True once everything is sent."""
        while chunks:
            try:
                n = conn.send(chunks[0])
            except BlockingIOError:
                return False
            chunks[0] = chunks[0][n:]
            if not len(chunks[0]):
                chunks.pop(0)
        return True

    def _read(self, conn: socket.socket, state: list) -> bool:
        """Receive what has arrived: the header, then the payload into its place; True once it is all in."""
        header, got, view, done, peer = state
        while True:
            try:
                if got < self._HEADER:
                    n = conn.recv_into(memoryview(header)[got:])
                else:
                    if got == self._HEADER and int.from_bytes(header, "little") != len(view):
                        raise RuntimeError(f"rank {self.rank}: rank {peer} sent {int.from_bytes(header, 'little')} "
                                           f"bytes where {len(view)} were expected (the ranks' calls disagree)")
                    if done == len(view):
                        return True
                    n = conn.recv_into(view[done:])
            except BlockingIOError:
                state[1], state[3] = got, done
                return False
            if n == 0:
                raise ConnectionError(f"rank {self.rank}: rank {peer} closed its connection")
            if got < self._HEADER:
                got += n
            else:
                done += n

    def barrier(self):
        self.all_gather_ints([0])

    def close(self):
        for conn in self._peers.values():
            conn.close()
        self._peers = {}


def _local_ip(host: str) -> str:
    """This machine's address on the route to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection while forming the group")
        data += chunk
    return data


class NcclCommunicator(Communicator):
    """NCCL through CuPy (``pip install latentmoe[gpu]``). One rank per GPU: NCCL rejects two ranks on one GPU.

    ``unique_id`` comes from ``NcclCommunicator.new_unique_id()`` on any process, handed to all ranks.
    """

    def __init__(self, rank: int, world_size: int, unique_id: tuple, device: torch.device | int = 0):
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank, self.world_size = rank, world_size
        self._start_counting()
        self.device = torch.device("cuda", device if isinstance(device, int) else device.index or 0)
        with torch.cuda.device(self.device):
            self._comm = nccl.NcclCommunicator(world_size, unique_id, rank)
        self._dtypes = {
            torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
            torch.bfloat16: nccl.NCCL_BFLOAT16, torch.int64: nccl.NCCL_INT64, torch.int32: nccl.NCCL_INT32,
        }

    @staticmethod
    def new_unique_id() -> tuple:
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    def _all_to_all(self, send, send_splits, recv_splits):
        assert send.is_cuda, "NcclCommunicator sends CUDA tensors"
        out = torch.empty((sum(recv_splits), *send.shape[1:]), dtype=send.dtype, device=send.device)
        row, elem = _row_numel(send), send.element_size()
        sends, recvs = peer_transfers(send_splits, row), peer_transfers(recv_splits, row)
        nccl_dtype = self._dtypes[send.dtype]
        stream = torch.cuda.current_stream(send.device).cuda_stream
        self._nccl.groupStart()
        for t in sends:
            self._comm.send(send.data_ptr() + t.offset * elem, t.count, nccl_dtype, t.peer, stream)
        for t in recvs:
            self._comm.recv(out.data_ptr() + t.offset * elem, t.count, nccl_dtype, t.peer, stream)
        self._nccl.groupEnd()
        return out, transfer_traffic(self.rank, self.world_size, sends, recvs, elem)

    def barrier(self):
        self.exchange_counts([0] * self.world_size)
        torch.cuda.synchronize(self.device)

    def close(self):
        self._comm.destroy()


def backend_for(device: str) -> str:
    """``tcp`` (``TcpCommunicator``) for CPU tensors, ``nccl`` for CUDA ones. ``LATENTMOE_CPU_COLLECTIVES=gloo``
    takes gloo for CPU tensors instead."""
    if torch.device(device).type == "cuda":
        return "nccl"
    backend = os.environ.get("LATENTMOE_CPU_COLLECTIVES", "tcp")
    if backend not in ("tcp", "gloo"):
        raise ValueError(f"LATENTMOE_CPU_COLLECTIVES={backend!r}: 'tcp' or 'gloo'")
    return backend


def new_rendezvous(backend: str, host: str) -> str | tuple:
    """What rank 0 hands every rank to form the group: a ``tcp://`` address (tcp, gloo) or an NCCL unique id."""
    if backend == "nccl":
        return NcclCommunicator.new_unique_id()
    return f"tcp://{host}:{free_port()}"


def make_communicator(backend: str, rank: int, world_size: int, rendezvous, timeout_s: float = 60.0) -> Communicator:
    if backend == "tcp":
        return TcpCommunicator(rank, world_size, rendezvous, timeout_s=timeout_s)
    if backend == "gloo":
        return GlooCommunicator(rank, world_size, rendezvous, timeout_s=timeout_s)
    if backend == "nccl":
        return NcclCommunicator(rank, world_size, rendezvous, device=0)  # Ray sets CUDA_VISIBLE_DEVICES per actor
    raise ValueError(f"unknown collective backend {backend!r}: 'tcp', 'gloo' or 'nccl'")
