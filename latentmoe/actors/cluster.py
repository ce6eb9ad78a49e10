"""Connect to (or start) a Ray cluster and bring up a router with its shards."""

from __future__ import annotations

import logging

import ray

from latentmoe.actors.names import ROUTER_NAMESPACE
from latentmoe.actors.router import RouterActor

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray cluster this process is connected to, else the one at ``address`` (default: the one
    running on this machine, as ``latentmoe cluster start`` or ``ray start`` leaves it), else a new local one."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", log_to_driver=False)
    except ConnectionError:
        if address:
            raise
        logger.warning("no running Ray cluster found: starting a single local node (attention and experts will "
                       "share it); `latentmoe cluster start` starts a local multi-node cluster")
        ray.init(log_to_driver=False)


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
