"""The expert shard actor: a thin Ray wrapper around an ``ExpertShard`` and its step loop.

Detached and named by slot (``<coordinator>-expert-<slot>``), so it outlives the coordinator that made
it and a restarted coordinator finds it again. The coordinator calls ``assign`` with each new group;
the step loop reports joins and faults back. No per-step Ray call reaches it.
"""

from __future__ import annotations

import os

import ray

from latentmoe.cluster.communicator import new_rendezvous
from latentmoe.cluster.membership import EXPERT, Group, Member
from latentmoe.cluster.shards import ExpertShard, shard_threads
from latentmoe.cluster.step_loop import Doorbell, StepLoop
from latentmoe.engine.engine_config import EngineConfig


def expert_actor_name(coordinator_name: str, slot: int) -> str:
    return f"{coordinator_name}-expert-{slot}"


@ray.remote
class ExpertShardActor:
    def __init__(self, config: dict, placement, slot: int, coordinator, incarnation: int,
                 collective_timeout_s: float):
        import torch

        torch.set_num_threads(shard_threads(ray.get_runtime_context().get_assigned_resources().get("CPU")))
        self.slot, self.coordinator = slot, coordinator
        self.shard = ExpertShard(EngineConfig.from_dict(config), placement, slot)
        self.doorbell = Doorbell(ray.util.get_node_ip_address())
        self.member = Member(f"expert-{slot}.{incarnation}", EXPERT, ray.get_runtime_context().get_node_id(),
                             self.doorbell.address, slot)
        self.steps = StepLoop(self.shard, self.member.id, self.doorbell, collective_timeout_s=collective_timeout_s,
                              on_joined=lambda epoch: self.coordinator.joined.remote(self.member.id, epoch),
                              on_fault=lambda epoch, error: self.coordinator.fault.remote(self.member.id, epoch,
                                                                                           error))

    def info(self) -> dict:
        return {"kind": EXPERT, "slot": self.slot, "member": self.member, "node_id": self.member.node_id,
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def rendezvous(self, backend: str):
        return new_rendezvous(backend, ray.util.get_node_ip_address())

    def assign(self, group: Group) -> None:
        self.steps.assign(group)

    def prepare(self, placement) -> dict:
        """Load this shard's experts under ``placement`` (a ``ReplicatedPlacement``) while the steps go on; the
        switch comes with the first group that carries it."""
        return self.shard.prepare(placement)

    def state(self) -> dict:
        """What a restarted coordinator rebuilds from, and what operators look at."""
        return {"group": self.steps.group, "epoch": self.steps.epoch, "alive": self.steps.alive,
                "num_steps": self.steps.num_steps, "num_faults": self.steps.num_faults,
                "num_rows": self.shard.num_rows, **self.shard.timings}

    def ping(self) -> bool:
        if self.steps.error is not None:
            raise RuntimeError(f"the step loop of expert shard {self.slot} stopped: {self.steps.error!r}")
        return True

    def stop(self) -> None:
        self.steps.stop()
        self.doorbell.close()
