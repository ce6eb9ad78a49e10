"""How the ingress picks an attention shard for a request: a custom Ray Serve request router.

Serve's default router (power of two choices) takes a replica whose queue length it has cached over one it has
not heard from yet, and probes the other only in the background. A shard that Serve has just added has no
entry, so a burst that arrives together all goes to the shards that were there before it (seen here: a second
wave of 8 streams all on the old shard, none on the new one). With a handful of attention shards per
application, there is no herd to avoid by sampling two: this router asks every shard it has not heard from,
then takes the least loaded of the rest, and among equally loaded shards the one with the most free latent
cache (from the shards' routing stats, which Serve collects every ``ROUTING_STATS_PERIOD_S``).
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

ROUTING_STATS_PERIOD_S = 2.0
ROUTER_PATH = "latentmoe.actors.shard_router.ShardRouter"


def free_cache_fraction(replica: RunningReplica) -> float:
    """The share of the shard's latent-cache blocks that are free, from its last routing stats (1.0 before any)."""
    stats = replica.routing_stats or {}
    total = stats.get("num_blocks") or 0
    return stats.get("num_free_blocks", total) / total if total else 1.0


class ShardRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranked groups, tried in order: the shards without a cached queue length (probed, the least loaded
        that accepts wins), then the others, least loaded first, the most free cache first among equals (Serve
        takes the first of the lowest queue length in a group, and probes a shard cached as full)."""
        cache = self.replica_queue_len_cache
        unknown, known = [], []
        for replica in candidate_replicas:
            (unknown if cache.get(replica.replica_id) is None else known).append(replica)
        known.sort(key=lambda r: (cache.get(r.replica_id), -free_cache_fraction(r)))
        return [group for group in (unknown, known) if group]
