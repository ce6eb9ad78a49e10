"""Connect to (or start) a Ray cluster and bring up the coordinator with its expert shards."""

from __future__ import annotations

import logging
from typing import Callable

import ray

from latentmoe.actors.local_cluster import (DEFAULT_PORT, LocalCluster, cluster_shape, find_local_cluster,
                                            running_ray_address, start_local_cluster, use_ray_auth)
from latentmoe.actors.names import ROUTER_NAMESPACE

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, attention_shards: int = 1, expert_shards: int = 1, *,
               echo: Callable[[str], None] | None = None, record: bool = False,
               port: int = DEFAULT_PORT, dashboard: bool = True, start: bool = True) -> LocalCluster | None:
    """Connect this process to a Ray cluster, starting one if there is none; returns the cluster it started.

    In order: the cluster this process is connected to; the one at ``address``; the one ``latentmoe cluster
    start`` (or ``latentmoe serve``) left on this machine; ``RAY_ADDRESS``, or the last ``ray start`` here;
    else a new local multi-node cluster sized for the shards (see ``cluster_shape``), which the caller owns and
    stops (``LocalCluster.stop``); with ``record`` other clients on this machine find it as well. Without
    ``start``, finding none is a ``RuntimeError`` (operator commands against a running cluster).
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
    if not start:
        raise RuntimeError("no running Ray cluster found: give its address (--ray-address), or start one "
                           "(latentmoe serve, latentmoe cluster start)")
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


def start_coordinator(config: dict, num_expert: int, name: str, *, timeout_s: float = 300.0,
                      step_timeout_s: float = 120.0, recovery_timeout_s: float | None = None,
                      place_by_role: bool | None = None):
    """Get the coordinator ``name``, or create it (detached, restartable, on a node without shards) and its
    expert shards; wait until they are up. Every caller with the same name shares it. Returns its handle."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from latentmoe.actors.coordinator import CoordinatorActor

    if place_by_role is None:
        place_by_role = has_role_nodes()
    options = dict(name=name, namespace=ROUTER_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                   # restarted when it dies; calls made meanwhile wait for the new one (retried), none fails
                   max_restarts=-1, max_task_retries=-1, max_concurrency=1000, enable_task_events=False,
                   # hard: a soft affinity places a 0-CPU actor on any node (measured with Ray 2.60: 4 of 8 elsewhere)
                   scheduling_strategy=NodeAffinitySchedulingStrategy(_router_node(), soft=False))
    coordinator = CoordinatorActor.options(**options).remote(
        config, num_expert, name, start_timeout_s=timeout_s, step_timeout_s=step_timeout_s,
        recovery_timeout_s=recovery_timeout_s, place_by_role=place_by_role)
    ray.get(coordinator.start.remote(), timeout=timeout_s + 30)
    return coordinator


def has_role_nodes() -> bool:
    """Whether the cluster's nodes say what they are (``attention_node`` / ``expert_node`` resources); when not,
    shards go wherever there is room, with a warning."""
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE

    have = ray.cluster_resources()
    if have.get(ATTENTION_RESOURCE) and have.get(EXPERT_RESOURCE):
        return True
    logger.warning("the Ray cluster advertises no %s / %s resources: placing every shard on the nodes that exist, "
                   "attention and experts not separated. Start nodes with `ray start --resources='{\"%s\": N}'` "
                   "(and %s), or run `latentmoe cluster start` on one machine.", ATTENTION_RESOURCE,
                   EXPERT_RESOURCE, ATTENTION_RESOURCE, EXPERT_RESOURCE)
    return False


def stop_coordinator(name: str | None = None) -> bool:
    """Stop the coordinator ``name`` (default: the Serve application's) and its expert shards, if it runs.
    Attention shards belong to Serve (``serve.shutdown()``) or to an ``LLM``. Returns whether it was running."""
    from latentmoe.actors.names import COORDINATOR_NAME

    try:
        coordinator = ray.get_actor(name or COORDINATOR_NAME, namespace=ROUTER_NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(coordinator.shutdown.remote(), timeout=60)
    finally:
        ray.kill(coordinator, no_restart=True)
    return True
