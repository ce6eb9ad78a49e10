"""Connect to (or start) a Ray cluster and bring up a router with its shards."""

from __future__ import annotations

import logging
from typing import Callable

import ray

from latentmoe.actors.local_cluster import (DEFAULT_PORT, LocalCluster, cluster_shape, find_local_cluster,
                                            running_ray_address, start_local_cluster, use_ray_auth)
from latentmoe.actors.names import ROUTER_NAMESPACE
from latentmoe.actors.router import RouterActor

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, attention_shards: int = 1, expert_shards: int = 1, *,
               echo: Callable[[str], None] | None = None, record: bool = False,
               port: int = DEFAULT_PORT, dashboard: bool = True) -> LocalCluster | None:
    """Connect this process to a Ray cluster, starting one if there is none; returns the cluster it started.

    In order: the cluster this process is connected to; the one at ``address``; the one ``latentmoe cluster
    start`` (or ``latentmoe serve``) left on this machine; ``RAY_ADDRESS``, or the last ``ray start`` here;
    else a new local multi-node cluster sized for the shards (see ``cluster_shape``), which the caller owns and
    stops (``LocalCluster.stop``); with ``record`` other clients on this machine find it as well.
    """
    if ray.is_initialized():
        return None
    if address:
        recorded = find_local_cluster(address=address)  # one of ours: join it with its authentication
        if recorded is not None:
            use_ray_auth(recorded.env)
        ray.init(address=address, log_to_driver=False)
        return None
    recorded = find_local_cluster(port)
    if recorded is not None:
        use_ray_auth(recorded.env)
        ray.init(address=recorded.address, log_to_driver=False)
        return None
    running = running_ray_address()
    if running is not None:
        ray.init(address=running, log_to_driver=False)
        return None
    echo = echo or logger.warning
    echo("no running Ray cluster found: starting a local multi-node one (head, attention and expert nodes)")
    cluster = start_local_cluster(**cluster_shape(attention_shards, expert_shards), port=port, dashboard=dashboard,
                                  echo=echo, record=record)
    try:
        use_ray_auth(cluster.env)
        ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        cluster.stop(echo)
        raise
    return cluster


def _router_node() -> str:
    """Where the router goes: this node, unless it holds shards (losing a shard's node must not take the router
    with it); then a live node without a shard role, the head first."""
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    shardless = [n for n in nodes if not {ATTENTION_RESOURCE, EXPERT_RESOURCE} & set(n.get("Resources", {}))]
    if not shardless or any(n["NodeID"] == here for n in shardless):
        return here
    head = [n for n in shardless if "node:__internal_head__" in n.get("Resources", {})]
    return (head or shardless)[0]["NodeID"]


def start_router(config: dict, num_attention: int, num_expert: int, *, timeout_s: float = 300.0,
                 step_timeout_s: float = 120.0, max_num_requests: int = 1024, name: str | None = None,
                 recovery_timeout_s: float | None = None):
    """Create the router actor (on this node, or on a node without shards), wait until its shards are up.

    With ``name``, the router is a detached named actor that every caller with the same name shares
    (the ingress replicas of a Serve application): the first creates it, the others get it.
    Returns ``(router handle, shard info)``.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # no task events: per-request and per-step calls would fill the GCS's task table (Serve turns them off too)
    options = dict(num_cpus=0, max_concurrency=1000, enable_task_events=False,
                   # hard: a soft affinity places a 0-CPU actor on any node (measured with Ray 2.60: 4 of 8 elsewhere)
                   scheduling_strategy=NodeAffinitySchedulingStrategy(_router_node(), soft=False))
    if name is not None:
        options |= dict(name=name, namespace=ROUTER_NAMESPACE, lifetime="detached", get_if_exists=True)
    router = RouterActor.options(**options).remote(config, num_attention, num_expert, start_timeout_s=timeout_s,
                                                   step_timeout_s=step_timeout_s, max_num_requests=max_num_requests,
                                                   recovery_timeout_s=recovery_timeout_s)
    try:
        info = ray.get(router.start.remote(), timeout=timeout_s + 30)
    except BaseException:
        try:
            ray.get(router.shutdown.remote(), timeout=30)
        finally:
            ray.kill(router)
        raise
    if info.get("placement_warning"):
        logger.warning(info["placement_warning"])
    return router, info
