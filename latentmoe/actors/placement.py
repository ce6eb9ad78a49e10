"""Where shards go: one placement group, attention bundles on attention nodes, expert bundles on expert nodes.

Nodes say what they are with custom resources (``ray start --resources='{"attention_node": 8}'``,
one unit per shard the node can hold, usually its GPU count). A cluster with no such nodes
gets every shard on the nodes that exist, with a warning; a placement group that cannot be
placed fails after a timeout with what it asked for and what the cluster has, never hangs.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ATTENTION_RESOURCE = "attention_node"
EXPERT_RESOURCE = "expert_node"

logger = logging.getLogger(__name__)


def shard_bundles(num_attention: int, num_expert: int, gpu: bool,
                  cluster_resources: dict[str, float]) -> tuple[list[dict], str | None]:
    """Bundles for ``num_attention`` then ``num_expert`` shards, and a warning when the roles can't be honoured."""
    base = {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}
    have_attention = cluster_resources.get(ATTENTION_RESOURCE, 0)
    have_expert = cluster_resources.get(EXPERT_RESOURCE, 0)
    if have_attention >= num_attention and have_expert >= num_expert:
        return ([base | {ATTENTION_RESOURCE: 1.0}] * num_attention + [base | {EXPERT_RESOURCE: 1.0}] * num_expert,
                None)
    warning = (
        f"the Ray cluster advertises {ATTENTION_RESOURCE}={have_attention:g} and {EXPERT_RESOURCE}={have_expert:g}, "
        f"but {num_attention} attention and {num_expert} expert shards were asked for: placing every shard on the "
        f"nodes that exist, attention and experts not separated. Start nodes with "
        f"`ray start --resources='{{\"{ATTENTION_RESOURCE}\": N}}'` (and {EXPERT_RESOURCE}), or run "
        f"`latentmoe cluster start` on one machine.")
    return [dict(base) for _ in range(num_attention + num_expert)], warning


async def place_shards(num_attention: int, num_expert: int, gpu: bool, timeout_s: float = 60.0):
    """Create and wait for the placement group; returns it, one scheduling strategy per shard, and any warning."""
    bundles, warning = shard_bundles(num_attention, num_expert, gpu, ray.cluster_resources())
    if warning:
        logger.warning(warning)
    # A placement group now and then stays pending with every resource it needs free (seen on Ray 2.60 when
    # the creator is a Serve replica's child); a fresh one is placed at once. So: retry, within the timeout.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        pg = placement_group(bundles, strategy="SPREAD")  # soft: shards spread over the nodes of their role
        attempt_s = min(15.0, deadline - loop.time())
        try:
            await asyncio.wait_for(pg.ready(), attempt_s)
            break
        except asyncio.TimeoutError:
            remove_placement_group(pg)
            if loop.time() >= deadline - 1e-3:
                raise RuntimeError(
                    f"could not place {num_attention} attention + {num_expert} expert shards within {timeout_s:g} s: "
                    f"they need {bundles}, the cluster has {ray.available_resources()} available") from None
            logger.warning("placement group for the shards not placed after %.0f s; retrying", attempt_s)
    strategies = [PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
                  for i in range(len(bundles))]
    return pg, strategies, warning
