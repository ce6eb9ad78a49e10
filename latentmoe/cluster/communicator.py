"""One interface for the step's collectives: counts exchange and all-to-all with uneven splits.

Backends: ``torch.distributed`` with gloo (CPU tensors) and NCCL through CuPy's bindings
(GPU tensors: group start, a send and a recv per peer, group end). The group is formed
once at start-up from an address or a unique id that the router hands to every shard
through the control plane; tensors of a step never go through Ray.
"""

from __future__ import annotations

import datetime
import socket
from abc import ABC, abstractmethod

import torch


class Communicator(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows ``send[sum(send_splits[:r]) : ...]`` go to rank r; returns the rows received, in rank order."""

    def exchange_counts(self, send_counts: list[int]) -> list[int]:
        """What every rank will send to this one (the split sizes, exchanged before the payload)."""
        assert len(send_counts) == self.world_size, f"{len(send_counts)} counts for {self.world_size} ranks"
        ones = [1] * self.world_size
        recv = self.all_to_all(torch.tensor(send_counts, dtype=torch.long, device=self.device)[:, None], ones, ones)
        return recv.flatten().tolist()

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class GlooCommunicator(Communicator):
    """``torch.distributed`` gloo process group; ``init_method`` is ``tcp://host:port`` of rank 0."""

    device = torch.device("cpu")

    def __init__(self, rank: int, world_size: int, init_method: str, timeout_s: float = 60.0):
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        self._dist = dist
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))

    def all_to_all(self, send, send_splits, recv_splits):
        out = torch.empty((sum(recv_splits), *send.shape[1:]), dtype=send.dtype)
        if self.world_size == 1:
            return send.clone()
        self._dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits)
        return out

    def barrier(self):
        self._dist.barrier()

    def close(self):
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class NcclCommunicator(Communicator):
    """NCCL through CuPy (``pip install latentmoe[gpu]``). One rank per GPU: NCCL rejects two ranks on one GPU.

    ``unique_id`` comes from ``NcclCommunicator.new_unique_id()`` on any process, handed to all ranks.
    """

    def __init__(self, rank: int, world_size: int, unique_id: tuple, device: torch.device | int = 0):
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank, self.world_size = rank, world_size
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

    def all_to_all(self, send, send_splits, recv_splits):
        assert send.is_cuda, "NcclCommunicator sends CUDA tensors"
        send = send.contiguous()
        row = send.shape[1:].numel() if send.dim() > 1 else 1
        out = torch.empty((sum(recv_splits), *send.shape[1:]), dtype=send.dtype, device=send.device)
        nccl_dtype = self._dtypes[send.dtype]
        stream = torch.cuda.current_stream(send.device).cuda_stream
        elem = send.element_size()
        self._nccl.groupStart()
        s_off = r_off = 0
        for peer in range(self.world_size):
            if send_splits[peer]:
                self._comm.send(send.data_ptr() + s_off * row * elem, send_splits[peer] * row, nccl_dtype, peer,
                                stream)
            if recv_splits[peer]:
                self._comm.recv(out.data_ptr() + r_off * row * elem, recv_splits[peer] * row, nccl_dtype, peer,
                                stream)
            s_off += send_splits[peer]
            r_off += recv_splits[peer]
        self._nccl.groupEnd()
        return out

    def barrier(self):
        self.exchange_counts([0] * self.world_size)
        torch.cuda.synchronize(self.device)

    def close(self):
        self._comm.destroy()


def backend_for(device: str) -> str:
    """``gloo`` for CPU tensors, ``nccl`` for CUDA ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def new_rendezvous(backend: str, host: str) -> str | tuple:
    """What rank 0 hands every rank to form the group: a ``tcp://`` address (gloo) or an NCCL unique id."""
    if backend == "nccl":
        return NcclCommunicator.new_unique_id()
    return f"tcp://{host}:{free_port()}"


def make_communicator(backend: str, rank: int, world_size: int, rendezvous, timeout_s: float = 60.0) -> Communicator:
    if backend == "gloo":
        return GlooCommunicator(rank, world_size, rendezvous, timeout_s=timeout_s)
    if backend == "nccl":
        return NcclCommunicator(rank, world_size, rendezvous, device=0)  # Ray sets CUDA_VISIBLE_DEVICES per actor
    raise ValueError(f"unknown collective backend {backend!r}: 'gloo' or 'nccl'")
