"""The communicators without Ray: TCP and gloo between real processes, the bytes each counts, and the per-peer
offsets and counts ``NcclCommunicator`` hands NCCL, checked on the CPU against the others' results; the TCP
backend's failures (a peer that dies, hangs or disagrees) and sends both ways larger than a socket's buffer."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from latentmoe.cluster.communicator import (PeerTransfer, Traffic, free_port, make_communicator, peer_transfers,
                                            transfer_traffic)

BACKENDS = ["tcp", "gloo"]


def run_ranks(worker, world: int, *args) -> dict:
    """``worker(rank, world, address, results, *args)`` in ``world`` fresh processes; their ``results``.

    Spawned, not forked: a fork of a pytest process that already ran Ray and torch's thread pools (earlier test
    modules) hangs its children in their first parallel op (seen: gloo sends timing out after test_serve).
    """
    address = f"tcp://127.0.0.1:{free_port()}"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(world, address, results, *args), nprocs=world, start_method="spawn")
        return dict(results)


def _all_to_all_worker(rank, world, address, results, backend):
    comm = make_communicator(backend, rank, world, address, timeout_s=120)
    # rank r sends (r + 1) * dest rows to rank dest (rank 0 sends nothing to anyone): uneven and empty splits
    send_splits = [0 if rank == 0 else (rank + 1) * dest for dest in range(world)]
    send = torch.cat([torch.full((n, 2), float(10 * rank + dest)) for dest, n in enumerate(send_splits)])
    recv_splits = comm.exchange_counts(send_splits)
    out = comm.all_to_all(send, send_splits, recv_splits)
    results[rank] = (recv_splits, out[:, 0].tolist())
    comm.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_to_all_uneven_splits(backend):
    world = 3
    results = run_ranks(_all_to_all_worker, world, backend)
    for rank in range(world):
        expected_splits = [0 if src == 0 else (src + 1) * rank for src in range(world)]
        recv_splits, values = results[rank]
        assert recv_splits == expected_splits
        assert values == [float(10 * src + rank) for src in range(world) for _ in range(expected_splits[src])]


def test_peer_transfers_by_hand():
    # 2 rows to rank 0, none to rank 1, 3 to rank 2, 1 to rank 3; rows of 4 elements
    assert peer_transfers([2, 0, 3, 1], 4) == [PeerTransfer(0, 0, 8), PeerTransfer(2, 8, 12), PeerTransfer(3, 20, 4)]
    assert peer_transfers([0, 0, 0], 7) == []
    traffic = transfer_traffic(2, 4, peer_transfers([2, 0, 3, 1], 4), peer_transfers([0, 5, 1, 0], 4), 2)
    assert traffic == Traffic(sent=[16, 0, 0, 8], received=[0, 40, 0, 0])  # rank 2's own rows are not traffic


# --- NcclCommunicator's arithmetic for uneven splits over 3+ ranks, against gloo ---------------------------------

def splits_matrix(world: int, seed: int) -> list[list[int]]:
    """``splits[src][dst]`` rows: random, with a rank that sends nothing, one that receives nothing from rank 0,
    and rows a rank sends to itself."""
    gen = torch.Generator().manual_seed(seed)
    splits = torch.randint(0, 6, (world, world), generator=gen)
    splits[1] = 0  # rank 1 sends nothing
    splits[0, world - 1] = 0
    splits[world - 1, world - 1] = 3
    return splits.tolist()


def send_rows(rank: int, splits: list[list[int]], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    n = sum(splits[rank])
    if dtype.is_floating_point:
        return torch.randn((n, *shape), generator=gen).to(dtype)
    return torch.randint(0, 250, (n, *shape), generator=gen).to(dtype)


def _splits_worker(rank, world, address, results, splits, shape, dtype, backend):
    comm = make_communicator(backend, rank, world, address, timeout_s=120)
    send_splits = splits[rank]
    recv_splits = comm.exchange_counts(send_splits)
    counts_traffic = comm.last_traffic
    out = comm.all_to_all(send_rows(rank, splits, shape, dtype), send_splits, recv_splits)
    results[rank] = dict(recv_splits=recv_splits, out=out.tolist(), dtype=out.dtype, counts=counts_traffic, last=comm.last_traffic,
                         total=comm.traffic)
    comm.close()


def nccl_all_to_all(sends: list[torch.Tensor], splits: list[list[int]]) -> list[torch.Tensor]:
    """What the NCCL group of ``NcclCommunicator.all_to_all`` does, on the CPU: each rank's ``send`` and ``recv``
    per peer (``peer_transfers``, pointers as element offsets) paired up, and the elements copied."""
    world = len(sends)
    outs = [torch.full((sum(splits[src][dst] for src in range(world)), *sends[0].shape[1:]), -1,
                       dtype=sends[0].dtype) for dst in range(world)]
    row = sends[0].shape[1:].numel()
    for src in range(world):
        for s in peer_transfers(splits[src], row):  # rank src's sends
            recvs = [r for r in peer_transfers([splits[r][s.peer] for r in range(world)], row) if r.peer == src]
            assert len(recvs) == 1 and recvs[0].count == s.count, (src, s, recvs)  # rank s.peer's recv from src
            outs[s.peer].view(-1)[recvs[0].offset:recvs[0].offset + s.count] = \
                sends[src].reshape(-1)[s.offset:s.offset + s.count]
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,shape,dtype", [
    (3, (3,), torch.float32), (4, (), torch.int64), (5, (2, 5), torch.uint8),  # uint8: the packed dispatch rows
    (3, (4,), torch.bfloat16),
])
def test_nccl_offsets_and_counts_match_cpu_backends(world, shape, dtype, backend):
    splits = splits_matrix(world, seed=world)
    gloo = run_ranks(_splits_worker, world, splits, shape, dtype, backend)
    sends = [send_rows(rank, splits, shape, dtype) for rank in range(world)]
    nccl = nccl_all_to_all(sends, splits)
    elem = torch.empty(0, dtype=dtype).element_size()
    row_bytes = torch.Size(shape).numel() * elem
    for rank in range(world):
        got = gloo[rank]
        assert got["recv_splits"] == [splits[src][rank] for src in range(world)]
        assert got["dtype"] == dtype and nccl[rank].tolist() == got["out"], rank
        # the bytes the CPU communicator counted: every other rank's rows, from the splits alone ...
        expected = Traffic([0 if dst == rank else splits[rank][dst] * row_bytes for dst in range(world)],
                           [0 if src == rank else splits[src][rank] * row_bytes for src in range(world)])
        assert got["last"] == expected
        # ... which is what the NCCL arithmetic would move
        row = torch.Size(shape).numel()
        assert transfer_traffic(rank, world, peer_transfers(splits[rank], row),
                                peer_transfers(got["recv_splits"], row), elem) == expected
        # the counts exchange: one int64 to and from each other rank; the total is both calls
        ones = [0 if r == rank else 8 for r in range(world)]
        assert got["counts"] == Traffic(ones, ones)
        assert got["total"] == got["counts"] + expected
    # what one rank sent another is what that one received from it
    for src in range(world):
        for dst in range(world):
            assert gloo[src]["last"].sent[dst] == gloo[dst]["last"].received[src]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and CuPy")
def test_nccl_one_rank_group():
    pytest.importorskip("cupy")
    from latentmoe.cluster.communicator import NcclCommunicator

    comm = NcclCommunicator(0, 1, NcclCommunicator.new_unique_id(), device=0)
    send = torch.randn(5, 3, device="cuda")
    assert comm.exchange_counts([5]) == [5]
    assert torch.equal(comm.all_to_all(send, [5], [5]), send)
    assert comm.traffic == Traffic([0], [0])  # a rank's own rows stay on it
    comm.close()


def _lanes_worker(rank, world, address, results, backend):
    """Two threads, each with its own lane, run their collectives at different paces: each matches only its own."""
    import random
    import threading
    import time

    comm = make_communicator(backend, rank, world, address, timeout_s=120)
    lanes = [comm, comm.lane()]
    got = {}

    def run(lane: int) -> None:
        rng = random.Random(10 * rank + lane)
        values = []
        for step in range(6):
            time.sleep(rng.random() * 0.02)
            rows = lanes[lane].all_gather_ints([100 * lane + step, rank])
            values.append(rows)
        got[lane] = values

    threads = [threading.Thread(target=run, args=(lane,)) for lane in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    results[rank] = got
    comm.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lanes_are_independent(backend):
    world = 3
    results = run_ranks(_lanes_worker, world, backend)
    for rank in range(world):
        for lane in (0, 1):
            assert results[rank][lane] == [[[100 * lane + step, src] for src in range(world)] for step in range(6)]


# --- the TCP backend's own cases -----------------------------------------------------------------------------------

def _both_ways_worker(rank, world, address, results):
    """Both ranks send the other 8 MB in one call, far over a socket's buffer: neither may wait on its send."""
    comm = make_communicator("tcp", rank, world, address, timeout_s=120)
    n = 2 * 1024 * 1024  # float32 elements per rank
    send = torch.arange(2 * n, dtype=torch.float32) + rank * 1e7  # n to each rank, itself included (exact in fp32)
    out = comm.all_to_all(send.view(2 * n, 1), [n, n], [n, n]).flatten()
    results[rank] = (bool(torch.equal(out[:n], torch.arange(n, dtype=torch.float32) + rank * n)),
                     bool(torch.equal(out[n:], torch.arange(n, dtype=torch.float32) + 1e7 + rank * n)))
    comm.close()


def test_tcp_sends_both_ways_larger_than_the_socket_buffers():
    results = run_ranks(_both_ways_worker, 2)
    assert results == {0: (True, True), 1: (True, True)}


def _failing_peer_worker(rank, world, address, results, case):
    import time

    comm = make_communicator("tcp", rank, world, address, timeout_s=2 if case == "hangs" else 60)
    comm.all_gather_ints([rank])  # the group works
    if rank == 1:
        if case == "dies":
            comm.close()
            return
        if case == "hangs":
            time.sleep(5)
            return
        comm.all_to_all(torch.zeros(3, 4), [3, 0], [0, 0])  # "disagrees": three rows where rank 0 expects two
        time.sleep(1)
        return
    start = time.monotonic()
    try:
        comm.all_to_all(torch.zeros(0, 4), [0, 0], [0, 2] if case == "disagrees" else [0, 3])
        results[rank] = ("no error", time.monotonic() - start)
    except Exception as e:  # noqa: BLE001: the test looks at what it was
        results[rank] = (f"{type(e).__name__}: {e}", time.monotonic() - start)
    comm.close()


@pytest.mark.parametrize("case,error", [("dies", "ConnectionError: rank 0: rank 1 closed its connection"),
                                        ("hangs", "TimeoutError: rank 0: no exchange with ranks [1] in 2 s"),
                                        ("disagrees", "RuntimeError: rank 0: rank 1 sent 48 bytes where 32 were")])
def test_tcp_peer_that_dies_hangs_or_disagrees_fails_the_exchange(case, error):
    message, seconds = run_ranks(_failing_peer_worker, 2, case)[0]
    assert message.startswith(error), message
    assert seconds < (4 if case == "hangs" else 2)  # a dead peer is seen at once, not at the timeout


def test_backend_for_devices_and_the_cpu_setting(monkeypatch):
    from latentmoe.cluster.communicator import backend_for

    monkeypatch.delenv("LATENTMOE_CPU_COLLECTIVES", raising=False)
    assert backend_for("cpu") == "tcp" and backend_for("cuda") == "nccl" and backend_for("cuda:1") == "nccl"
    monkeypatch.setenv("LATENTMOE_CPU_COLLECTIVES", "gloo")
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
    monkeypatch.setenv("LATENTMOE_CPU_COLLECTIVES", "mpi")
    with pytest.raises(ValueError, match="LATENTMOE_CPU_COLLECTIVES='mpi': 'tcp' or 'gloo'"):
        backend_for("cpu")
