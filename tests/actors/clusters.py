"""The Ray cluster the actor tests start in their process: a head and worker nodes that advertise their role."""

from __future__ import annotations

from contextlib import contextmanager

import ray
from ray.cluster_utils import Cluster

from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_node


@contextmanager
def role_cluster(expert_nodes: int = 1, attention_nodes: int = 1, shards_per_node: int = 2):
    """A head (1 CPU) and role nodes of ``shards_per_node`` CPUs and units each; this process joins it.

    Yields ``{"attention": {node ids}, "expert": {node ids}}``.
    """
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        "attention": [c.add_node(num_cpus=shards_per_node, **role_node(ATTENTION_RESOURCE, shards_per_node))
                      for _ in range(attention_nodes)],
        "expert": [c.add_node(num_cpus=shards_per_node, **role_node(EXPERT_RESOURCE, shards_per_node))
                   for _ in range(expert_nodes)],
    }
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield {role: {n.node_id for n in ns} for role, ns in nodes.items()}
    finally:
        ray.shutdown()
        c.shutdown()
