"""The shard actor: a thin Ray wrapper that holds an ``AttentionShard`` or an ``ExpertShard``.

The router fans out to shards with ``execute(method, *args)``; the step's tensors never pass
through here (they go through the collective group the shards form with ``connect``).
"""

from __future__ import annotations

import ray

from latentmoe.cluster.communicator import make_communicator, new_rendezvous
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.cluster.shards import AttentionShard, ExpertShard, shard_threads


@ray.remote
class ShardActor:
    def __init__(self, kind: str, config: dict, placement: ExpertPlacement, index: int, expert_ranks: list[int]):
        import torch

        torch.set_num_threads(shard_threads(ray.get_runtime_context().get_assigned_resources().get("CPU")))
        self.kind, self.index = kind, index
        engine_config = EngineConfig.from_dict(config)
        if kind == "attention":
            self.shard = AttentionShard(engine_config, placement, expert_ranks)
        elif kind == "expert":
            self.shard = ExpertShard(engine_config, placement, index)
        else:
            raise ValueError(f"unknown shard kind {kind!r}")
        self.comm = None
        self.num_steps_received = 0

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"kind": self.kind, "index": self.index, "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "pid": __import__("os").getpid()}

    def rendezvous(self, backend: str):
        return new_rendezvous(backend, ray.util.get_node_ip_address())

    def connect(self, backend: str, rank: int, world_size: int, rendezvous, timeout_s: float,
                expert_ranks: list[int] | None = None) -> None:
        """Form (or, after a fault, re-form) the collective group; ``timeout_s`` bounds every collective."""
        self.close()
        self.comm = make_communicator(backend, rank, world_size, rendezvous, timeout_s)
        if self.kind == "attention":
            self.shard.connect(self.comm, expert_ranks)
        else:
            self.shard.connect(self.comm)

    def execute(self, method: str, *args):
        if method == "step":
            self.num_steps_received += 1
        return getattr(self.shard, method)(*args)

    def steps_received(self) -> int:
        return self.num_steps_received

    def close(self) -> None:
        if self.comm is not None:
            comm, self.comm = self.comm, None
            try:
                comm.close()
            except Exception:  # noqa: BLE001: a group broken by a dead peer may not close cleanly
                pass
