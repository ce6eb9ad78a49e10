"""The router's bookkeeping, as plain Python: which shard holds which request, what to send each
shard with its next step, and where each shard stands. The actor (``latentmoe.actors.router``)
adds Ray and asyncio around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latentmoe.cluster.shards import NewRequest


class OverloadedError(RuntimeError):
    """The router is at its bound on requests in flight: HTTP 503 / gRPC RESOURCE_EXHAUSTED at the edge."""


class NoShardError(RuntimeError):
    """No attention shard is left (they died and none could be replaced): HTTP 503 / gRPC UNAVAILABLE."""


@dataclass
class ShardState:
    live: set[str] = field(default_factory=set)  # requests on (or on their way to) this shard
    new: list[NewRequest] = field(default_factory=list)  # to hand over with the next step
    aborts: list[str] = field(default_factory=list)  # to abort with the next step
    cache: dict = field(default_factory=dict)  # the shard's cache_stats() after its last step
    alive: bool = True  # False once the shard died and no replacement could be brought up


class RouterState:
    def __init__(self, num_attention_shards: int):
        self.shards = [ShardState() for _ in range(num_attention_shards)]
        self.shard_of: dict[str, int] = {}

    def choose_shard(self) -> int:
        """Fewest requests first; then the most free cache blocks. Only shards that are alive."""
        alive = [i for i, s in enumerate(self.shards) if s.alive]
        if not alive:
            raise NoShardError("no attention shard is left to serve requests")
        return min(alive, key=lambda i: (len(self.shards[i].live), -self.shards[i].cache.get("num_free_blocks", 0), i))

    def add(self, req: NewRequest) -> int:
        assert req.request_id not in self.shard_of, f"duplicate request id {req.request_id!r}"
        i = self.choose_shard()
        self.shards[i].live.add(req.request_id)
        self.shards[i].new.append(req)
        self.shard_of[req.request_id] = i
        return i

    def abort(self, request_id: str) -> bool:
        """Abort a live request; returns False when it is unknown or already done."""
        i = self.shard_of.get(request_id)
        if i is None:
            return False
        shard = self.shards[i]
        pending = [r for r in shard.new if r.request_id == request_id]
        if pending:  # never reached the shard: nothing to free there
            shard.new.remove(pending[0])
            self.done(request_id)
        else:
            shard.aborts.append(request_id)
        return True

    def move(self, req: NewRequest) -> int:
        """Hand a live request to a shard afresh (its shard died, or lost it in a failed step)."""
        i = self.shard_of.pop(req.request_id)
        shard = self.shards[i]
        shard.live.discard(req.request_id)
        shard.new = [r for r in shard.new if r.request_id != req.request_id]
        shard.aborts = [r for r in shard.aborts if r != req.request_id]
        return self.add(req)

    def done(self, request_id: str) -> None:
        i = self.shard_of.pop(request_id, None)
        if i is not None:
            self.shards[i].live.discard(request_id)

    @property
    def has_work(self) -> bool:
        return any(s.alive and (s.live or s.aborts) for s in self.shards)

    def take_step_inputs(self) -> list[tuple[list[NewRequest], list[str]]]:
        inputs = [(s.new, s.aborts) for s in self.shards]
        for s in self.shards:
            s.new, s.aborts = [], []
        return inputs
