"""Dispatch and combine of routed-expert work over a communicator, once per MoE layer.

Attention side: after the gate's device-limited top-k, each token is sent **once per
destination expert shard**, with its k expert slots on that shard (``-1`` for slots
that live elsewhere) and their weights. Split sizes go first (a small all-to-all of
counts), then hidden states and routing metadata (all-to-all with uneven splits). The
expert shard runs its experts grouped by expert and returns one weighted partial sum
per received token, which the attention side adds up.

Per MoE layer, three exchanges: the counts (attention shards to expert shards only), the rows (hidden
states and routing metadata packed into one byte tensor) and the partial sums back; a decode pass makes two
in every layer after its first (``padded_dispatch_tokens``: the rows in a block of fixed size, their count
inside). Each is point to point between the ranks that have something for each other: expert shards never
talk to each other. The traffic in the statistics is what the communicator counted it moved (padding
included); the ideal next to it is worked out from the routing alone.

Every rank calls the same exchanges in the same order, with empty ones when it has nothing to send, so
the group stays in lockstep.

Legend: T tokens on this attention shard, K experts per token, S expert shards,
W world size, M rows sent (Σ over tokens of distinct shards reached), D hidden.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from latentmoe.cluster.communicator import Communicator
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.cluster.telemetry import plus


@dataclass
class DispatchPlan:
    send_counts: list[int]  # [S] rows for each expert shard
    token_index: torch.Tensor  # [M] token of each row, rows grouped by destination
    slot_ids: torch.Tensor  # [M, K] expert slot on the destination, -1 if not there
    weights: torch.Tensor  # [M, K] float32
    devices_per_token: torch.Tensor  # [T] distinct shards each token reaches


def plan_dispatch(topk_ids: torch.Tensor, topk_weights: torch.Tensor, shard_of_expert: torch.Tensor,
                  slot_of_expert: torch.Tensor, num_shards: int) -> DispatchPlan:
    T, K = topk_ids.shape
    dest = shard_of_expert[topk_ids]  # [T, K]
    reach = torch.zeros(T, num_shards, dtype=torch.bool, device=topk_ids.device)
    reach.scatter_(1, dest, True)  # [T, S]
    slots = slot_of_expert[topk_ids]  # [T, K]
    index, slot_rows, weight_rows, counts = [], [], [], []
    for s in range(num_shards):
        tokens = reach[:, s].nonzero().flatten()  # [M_s]
        here = dest[tokens] == s  # [M_s, K]
        index.append(tokens)
        slot_rows.append(torch.where(here, slots[tokens], -1))
        weight_rows.append(topk_weights[tokens].float())
        counts.append(len(tokens))
    return DispatchPlan(counts, torch.cat(index), torch.cat(slot_rows), torch.cat(weight_rows), reach.sum(1))


@dataclass
class DispatchStats:
    """Expert-load statistics gathered on an attention shard; plain numbers, summed across shards."""

    num_experts: int
    num_shards: int
    max_k: int
    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)  # layer -> [E]
    tokens_per_shard: list[int] = field(default_factory=list)  # [S], rows sent (token, shard) pairs
    pairs_per_shard: list[int] = field(default_factory=list)  # [S], (token, expert) pairs computed: the work
    devices_histogram: list[int] = field(default_factory=list)  # [max_k + 1]: tokens reaching n shards
    # bytes the communicator moved (sent + received) in the dispatch and combine: rows with their routing
    # metadata there, partial sums back
    a2a_bytes: int = 0
    a2a_counts_bytes: int = 0  # bytes the communicator moved exchanging the split sizes
    # of a2a_bytes, what padded blocks added to the rows (header rows and padding): a2a_bytes = ideal + this
    a2a_padding_bytes: int = 0
    ideal_bytes: int = 0  # each token once per distinct destination shard, with its metadata, there and back

    def __post_init__(self):
        self.tokens_per_shard = self.tokens_per_shard or [0] * self.num_shards
        self.pairs_per_shard = self.pairs_per_shard or [0] * self.num_shards
        self.devices_histogram = self.devices_histogram or [0] * (self.max_k + 1)

    def record(self, layer: int, topk_ids: torch.Tensor, plan: DispatchPlan, bytes_per_row: int) -> None:
        """Routing counts of one layer, and its ideal traffic: ``bytes_per_row`` there and back per (token, shard)."""
        counts = torch.bincount(topk_ids.flatten(), minlength=self.num_experts).tolist()
        row = self.tokens_per_expert.setdefault(layer, [0] * self.num_experts)
        self.tokens_per_expert[layer] = [a + b for a, b in zip(row, counts)]
        self.tokens_per_shard = plus(self.tokens_per_shard, plan.send_counts)
        pairs = torch.stack([rows.sum() for rows in (plan.slot_ids >= 0).sum(1).split(plan.send_counts)]).tolist()
        self.pairs_per_shard = plus(self.pairs_per_shard, pairs)
        hist = torch.bincount(plan.devices_per_token, minlength=self.max_k + 1).tolist()
        self.devices_histogram = [a + b for a, b in zip(self.devices_histogram, hist)]
        self.ideal_bytes += int(plan.devices_per_token.sum()) * bytes_per_row

    def merge(self, other: "DispatchStats") -> None:
        for layer, row in other.tokens_per_expert.items():
            mine = self.tokens_per_expert.setdefault(layer, [0] * self.num_experts)
            self.tokens_per_expert[layer] = [a + b for a, b in zip(mine, row)]
        self.tokens_per_shard = plus(self.tokens_per_shard, other.tokens_per_shard)
        self.pairs_per_shard = plus(self.pairs_per_shard, other.pairs_per_shard)
        self.devices_histogram = [a + b for a, b in zip(self.devices_histogram, other.devices_histogram)]
        self.a2a_bytes += other.a2a_bytes
        self.a2a_counts_bytes += other.a2a_counts_bytes
        self.a2a_padding_bytes += other.a2a_padding_bytes
        self.ideal_bytes += other.ideal_bytes

    @classmethod
    def from_dict(cls, d: dict, num_experts: int, num_shards: int, max_k: int) -> "DispatchStats":
        stats = cls(num_experts, num_shards, max_k)
        if d:
            stats.tokens_per_expert = {int(k): list(v) for k, v in d["tokens_per_expert"].items()}
            stats.tokens_per_shard, stats.devices_histogram = list(d["tokens_per_shard"]), list(d["devices_histogram"])
            stats.pairs_per_shard = list(d.get("pairs_per_shard") or [0] * num_shards)
            stats.a2a_bytes, stats.a2a_counts_bytes = d["a2a_bytes"], d["a2a_counts_bytes"]
            stats.a2a_padding_bytes = d.get("a2a_padding_bytes", 0)
            stats.ideal_bytes = d["ideal_bytes"]
        return stats

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": {str(k): v for k, v in sorted(self.tokens_per_expert.items())},
            "tokens_per_shard": self.tokens_per_shard, "pairs_per_shard": self.pairs_per_shard,
            "devices_histogram": self.devices_histogram,
            "a2a_bytes": self.a2a_bytes, "a2a_counts_bytes": self.a2a_counts_bytes, "ideal_bytes": self.ideal_bytes,
            "a2a_padding_bytes": self.a2a_padding_bytes,
        }


def pack_rows(hidden: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``hidden [M, D]`` (any dtype) and ``meta [M, 2K]`` float32 as one byte tensor ``[M, D*size + 8K]``,
    so one all-to-all carries both."""
    return torch.cat([hidden.contiguous().view(torch.uint8), meta.contiguous().view(torch.uint8)], dim=1)


def unpack_rows(payload: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    split = hidden_size * dtype.itemsize
    return payload[:, :split].contiguous().view(dtype), payload[:, split:].contiguous().view(torch.float32)


def padded(tokens: int, padded_max_tokens: int) -> bool:
    """Whether a pass of ``tokens`` tokens sends its rows of the later MoE layers padded, their count inside."""
    return 0 < padded_max_tokens and tokens <= padded_max_tokens


def read_count(block: torch.Tensor) -> int:
    """The row count of a padded block, from the first 8 bytes of its header row (``block [1 + cap, row_bytes]``)."""
    return int(block[0, :8].contiguous().view(torch.long))


class AttentionDispatcher:
    """The attention side of the exchange; ``dispatch(layer, h, ids, weights)`` is the model's ``routed_fn`` (the
    exchange in flight), ``routed`` the same there and back in one call.

    ``placement``: an ``ExpertPlacement``, or a ``ReplicatedPlacement`` (``latentmoe.cluster.eplb``), whose copies
    of hot experts a token uses on the shards it visits anyway. The dispatchers of one shard's micro-batches (one
    per lane) share ``stats`` and the lock that guards it.

    ``padded_max_tokens`` > 0 (and ``first_layer``, the pass's first MoE layer): two exchanges per MoE layer after
    the first instead of three. In the first layer the counts carry the pass's token count T too; in the later
    ones, when T is at most ``padded_max_tokens``, each expert shard gets a block of T + 1 rows (a header row with
    the count, the rows, then padding: no token goes twice to one shard), sized without asking, as DeepEP's
    low-latency mode does. Larger passes (prefill) keep the counts: their padding would cost more than the
    exchange it saves."""

    def __init__(self, comm: Communicator, placement, expert_ranks: list[int], max_k: int,
                 num_experts: int, stats: DispatchStats | None = None, lock: threading.Lock | None = None,
                 padded_max_tokens: int = 0, first_layer: int | None = None):
        # eplb builds on this module's plan_dispatch
        from latentmoe.cluster.eplb import ReplicatedPlacement, plan_dispatch_replicated

        self._plan = plan_dispatch_replicated
        if isinstance(placement, ExpertPlacement):
            placement = ReplicatedPlacement.from_placement(placement)
        self.comm, self.placement, self.expert_ranks = comm, placement, expert_ranks
        self.stats = stats if stats is not None else DispatchStats(num_experts, placement.num_shards, max_k)
        self.lock = lock or threading.Lock()
        self.a2a_seconds = 0.0  # time spent in the collectives (waiting for the expert shards included)
        self.padded_max_tokens = padded_max_tokens if first_layer is not None else 0
        self.first_layer = first_layer
        # rows are grouped by destination shard and laid out by rank: the two orders must agree
        assert expert_ranks == sorted(expert_ranks), f"expert ranks out of slot order: {expert_ranks}"

    def routed(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The layer's exchange, there and back: the weighted sum of the routed experts ``[T, D]``."""
        return self.dispatch(layer, h, topk_ids, topk_weights)()

    def dispatch(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Send the layer's rows to the expert shards; returns the second half, which receives their partial
        sums and adds them up. What the caller does in between (the shared experts) overlaps the experts' work:
        the model's ``routed_fn`` on attention shards."""
        plan = self._plan(topk_ids, topk_weights, self.placement)
        W, T = self.comm.world_size, h.shape[0]
        send_counts = [0] * W
        for shard, rank in enumerate(self.expert_ranks):
            send_counts[rank] = plan.send_counts[shard]
        hidden = h[plan.token_index]  # [M, D]
        meta = torch.cat([plan.slot_ids.float(), plan.weights], dim=1)  # [M, 2K] (slot ids are exact in float32)
        rows = pack_rows(hidden, meta)
        start = time.perf_counter()
        counts_bytes = padding_bytes = 0
        first = self.padded_max_tokens == 0 or layer == self.first_layer
        if first or not padded(T, self.padded_max_tokens):
            # the counts go to the expert shards only (an attention shard receives no rows); with padding on, the
            # first layer's carry the pass's token count too
            values = [[send_counts[r], T] if self.padded_max_tokens else [send_counts[r]] for r in self.expert_ranks]
            to = [int(r in self.expert_ranks) for r in range(W)]
            self.comm.all_to_all(torch.tensor(values, dtype=torch.long, device=h.device).reshape(len(values), -1),
                                 to, [0] * W)
            counts_bytes = self.comm.last_traffic.num_bytes
            self.comm.all_to_all(rows, send_counts, [0] * W)
        else:  # a block of T + 1 rows to each expert shard, the count in its header row
            block, S = T + 1, len(self.expert_ranks)
            buf = torch.zeros(S * block, rows.shape[1], dtype=torch.uint8, device=h.device)
            # every block's count in the first 8 bytes of its header row, in one copy
            buf.view(S, block, -1)[:, 0, :8] = torch.tensor(plan.send_counts, dtype=torch.long).view(torch.uint8) \
                .view(S, 8)
            offset = 0
            for shard, n in enumerate(plan.send_counts):
                buf[shard * block + 1 : shard * block + 1 + n] = rows[offset : offset + n]
                offset += n
            self.comm.all_to_all(buf, [block if r in self.expert_ranks else 0 for r in range(W)], [0] * W)
            padding_bytes = (len(buf) - rows.shape[0]) * rows.shape[1]
        rows_bytes = self.comm.last_traffic.num_bytes
        self.a2a_seconds += time.perf_counter() - start
        return functools.partial(self._combine, layer, h, topk_ids, plan, send_counts, rows_bytes, counts_bytes,
                                 padding_bytes)

    def _combine(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor, plan, send_counts: list[int],
                 rows_bytes: int, counts_bytes: int, padding_bytes: int) -> torch.Tensor:
        """The second half of ``dispatch``: the partial sums back, added up per token; then the layer's statistics,
        all in one update (a reader sees every layer whole: bytes moved = ideal + padding)."""
        W = self.comm.world_size
        start = time.perf_counter()
        partial = self.comm.all_to_all(torch.empty(0, h.shape[1], dtype=h.dtype, device=h.device),
                                       [0] * W, send_counts)  # [M, D], same order as sent
        rows_bytes += self.comm.last_traffic.num_bytes
        self.a2a_seconds += time.perf_counter() - start
        routed = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        routed.index_add_(0, plan.token_index, partial.float())
        K = topk_ids.shape[1]
        hidden_bytes = h.shape[1] * h.element_size()
        with self.lock:
            self.stats.record(layer, topk_ids, plan, bytes_per_row=2 * hidden_bytes + 2 * K * 4)  # + slots, weights
            self.stats.a2a_bytes += rows_bytes
            self.stats.a2a_counts_bytes += counts_bytes
            self.stats.a2a_padding_bytes += padding_bytes
        return routed.to(h.dtype)


def expert_exchange(comm: Communicator, experts, hidden_size: int, k: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu", slot_map: torch.Tensor | None = None,
                    attention_ranks: list[int] | None = None, padded_max_tokens: int = 0,
                    pass_tokens: dict[int, int] | None = None) -> tuple[int, float, dict[int, int]]:
    """The expert side of one MoE layer: receive rows, run ``experts`` (a ``RoutedExperts``), send sums back.

    ``slot_map [P]``: the index in ``experts`` of each placement slot (the rows carry placement slots); without
    it they are the same. ``attention_ranks``: the ranks that send rows (the counts come from them only; by
    default from every rank). ``padded_max_tokens`` as ``AttentionDispatcher``'s; ``pass_tokens``: each sender's
    token count in this pass, from the pass's first MoE layer (None: this is the first). Returns the number of
    rows processed, the seconds spent in the experts, and ``pass_tokens`` for the next layer.
    """
    W = comm.world_size
    senders = list(range(W)) if attention_ranks is None else list(attention_ranks)
    zeros = [0] * W
    row_bytes = hidden_size * dtype.itemsize + 2 * k * 4
    width = 2 if padded_max_tokens else 1
    if pass_tokens is None or not padded_max_tokens:
        asking = senders  # the first layer (or padding off): every sender says its count
    else:
        asking = [r for r in senders if not padded(pass_tokens[r], padded_max_tokens)]
    recv_counts = [0] * W
    if asking:
        got = comm.all_to_all(torch.empty(0, width, dtype=torch.long, device=device), zeros,
                              [int(r in asking) for r in range(W)]).tolist()
        for r, values in zip(sorted(asking), got):
            recv_counts[r] = values[0]
        if pass_tokens is None and padded_max_tokens:
            pass_tokens = {r: values[1] for r, values in zip(sorted(asking), got)}
    blocks = [pass_tokens[r] + 1 if r in senders and r not in asking else 0 for r in range(W)] if pass_tokens \
        else zeros
    splits = [blocks[r] or recv_counts[r] for r in range(W)]
    payload = comm.all_to_all(torch.empty(0, row_bytes, dtype=torch.uint8, device=device), zeros, splits)
    if any(blocks):  # cut each padded block to its rows
        parts, offset = [], 0
        for r in range(W):
            if blocks[r]:
                recv_counts[r] = read_count(payload[offset:])
                parts.append(payload[offset + 1 : offset + 1 + recv_counts[r]])
            elif splits[r]:
                parts.append(payload[offset : offset + splits[r]])
            offset += splits[r]
        payload = torch.cat(parts) if parts else payload[:0]
    hidden, meta = unpack_rows(payload, hidden_size, dtype)
    slot_ids, weights = meta[:, :k].long(), meta[:, k:]
    if slot_map is not None and len(slot_ids):
        slot_ids = torch.where(slot_ids >= 0, slot_map[slot_ids.clamp(min=0)], -1)
    start = time.perf_counter()
    out = experts.moe_impl(hidden, experts.w13, experts.w2, slot_ids, weights) if len(hidden) else hidden
    compute = time.perf_counter() - start
    comm.all_to_all(out.to(dtype), recv_counts, zeros)
    return len(hidden), compute, pass_tokens
