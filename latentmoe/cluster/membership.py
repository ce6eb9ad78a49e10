"""Membership of the collective group, as plain Python: who is in it, under which epoch, at which rank.

The coordinator (``latentmoe.actors.coordinator``) keeps one ``Membership``; every change — an attention
shard joining (scale-out, a replacement) or leaving (scale-in, a death), an expert shard replaced, expert
shards added or removed — makes a new ``Group`` under the next epoch, which every member switches to at its
next step boundary. Ranks: the expert shards first, in slot order (rank 0 is expert slot 0, which also hosts
the rendezvous), then the attention shards in the order they joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION, EXPERT = "attention", "expert"


@dataclass(frozen=True)
class Member:
    """One shard as the group knows it. ``doorbell``: the (host, port) that wakes its parked step loop."""

    id: str  # "expert-0", "attention-<replica>"
    kind: str  # ATTENTION | EXPERT
    node_id: str = ""
    doorbell: tuple[str, int] | None = None
    slot: int | None = None  # expert shards: which slice of the experts it holds

    def __post_init__(self):
        assert self.kind in (ATTENTION, EXPERT), f"unknown member kind {self.kind!r}"
        assert (self.slot is not None) == (self.kind == EXPERT), f"{self.id}: slot {self.slot} for {self.kind}"


@dataclass(frozen=True)
class Group:
    """A formed (or forming) collective group: what every member needs to join it."""

    epoch: int
    members: tuple[Member, ...]
    backend: str = "tcp"
    rendezvous: object = None  # tcp://host:port (tcp, gloo) or an NCCL unique id
    # the expert placement in force for this epoch (``latentmoe.cluster.eplb.ReplicatedPlacement``): every member
    # switches to it at the same step boundary as to the group
    placement: object = None

    def rank_of(self, member_id: str) -> int | None:
        for rank, m in enumerate(self.members):
            if m.id == member_id:
                return rank
        return None

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def expert_ranks(self) -> list[int]:
        """Rank of each expert slot, in slot order."""
        experts = sorted((m.slot, rank) for rank, m in enumerate(self.members) if m.kind == EXPERT)
        return [rank for _, rank in experts]

    @property
    def attention_ranks(self) -> list[int]:
        return [rank for rank, m in enumerate(self.members) if m.kind == ATTENTION]

    @property
    def attention_ids(self) -> list[str]:
        return [m.id for m in self.members if m.kind == ATTENTION]

    def peers_of(self, member_id: str) -> list[tuple[str, int]]:
        """The doorbells of everyone else."""
        return [m.doorbell for m in self.members if m.id != member_id and m.doorbell is not None]


@dataclass
class Membership:
    """The coordinator's view: the group in force, and the changes waiting for the next epoch."""

    num_expert: int
    group: Group | None = None
    experts: dict[int, Member] = field(default_factory=dict)  # slot -> its live expert shard
    attention: dict[str, Member] = field(default_factory=dict)  # id -> attention shard, in join order
    leaving: set[str] = field(default_factory=set)  # draining attention shards: out at the next epoch

    @property
    def epoch(self) -> int:
        return self.group.epoch if self.group is not None else 0

    def join(self, member: Member) -> None:
        if member.kind == EXPERT:
            assert 0 <= member.slot < self.num_expert, f"expert slot {member.slot} of {self.num_expert}"
            self.experts[member.slot] = member
        else:
            self.attention[member.id] = member
            self.leaving.discard(member.id)

    def leave(self, member_id: str) -> None:
        """An attention shard asks to go (scale-in): it stays a member until the next group is formed."""
        if member_id in self.attention:
            self.leaving.add(member_id)

    def drop(self, member_id: str) -> Member | None:
        """A member is gone (dead, hung, or left): not in the next group."""
        self.leaving.discard(member_id)
        if member_id in self.attention:
            return self.attention.pop(member_id)
        for slot, m in list(self.experts.items()):
            if m.id == member_id:
                return self.experts.pop(slot)
        return None

    def resize(self, num_expert: int, joining: list[Member] = ()) -> list[Member]:
        """The number of expert slots changes (with the placement, at the next group): ``joining`` fill the new
        slots; the shards of slots past the new number are out of the next group. Returns those."""
        gone = [self.experts.pop(slot) for slot in sorted(self.experts) if slot >= num_expert]
        self.num_expert = num_expert
        for member in joining:
            self.join(member)
        return gone

    def next_members(self) -> tuple[Member, ...]:
        """The members of the next group: every expert slot in order, then attention shards not leaving."""
        experts = tuple(self.experts[s] for s in sorted(self.experts))
        return experts + tuple(m for i, m in self.attention.items() if i not in self.leaving)

    def needs_new_group(self) -> bool:
        return self.group is None or self.next_members() != self.group.members

    def complete(self) -> bool:
        """Every expert slot has a live shard (without one, tokens routed to its experts have nowhere to go)."""
        return len(self.experts) == self.num_expert

    def new_group(self, backend: str, rendezvous, placement=None) -> Group:
        assert self.complete(), f"expert slots {sorted(self.experts)} of {self.num_expert}: not all are up"
        self.group = Group(self.epoch + 1, self.next_members(), backend, rendezvous, placement)
        for member_id in self.leaving:  # left: gone with this epoch
            self.attention.pop(member_id, None)
        self.leaving.clear()
        return self.group

    def adopt(self, group: Group) -> None:
        """A restarted coordinator takes over the group its members are running."""
        if self.group is not None and group.epoch <= self.group.epoch:
            return
        self.group = group
        self.experts = {m.slot: m for m in group.members if m.kind == EXPERT}
        self.attention = {m.id: m for m in group.members if m.kind == ATTENTION}
        self.leaving = set()
