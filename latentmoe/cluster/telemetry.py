"""Expert-load statistics over time windows, and per-request latencies. Plain Python, no Ray.

Attention shards keep cumulative dispatch statistics (``DispatchStats``); the router receives a
snapshot from each about once a second and keeps the differences in a ring of timestamped
deltas, so that "the last N seconds" is a sum over the ring. The full (layer x expert) counts
live here and are served as JSON; only a few aggregates go to Prometheus.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


def imbalance(counts: list[int]) -> float:
    """max / mean (1.0 is perfect balance; 0 when nothing was counted)."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else 0.0


def plus(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two count lists, the shorter one padded with zeros: per-shard counts grow when the
    number of expert shards does, and keep the counts of shards that went."""
    if len(a) < len(b):
        a, b = b, a
    return [x + (b[i] if i < len(b) else 0) for i, x in enumerate(a)]


@dataclass
class LoadDelta:
    time: float
    tokens_per_expert: dict[int, list[int]]  # layer -> [E]
    tokens_per_shard: list[int]
    pairs_per_shard: list[int]
    devices_histogram: list[int]
    a2a_bytes: int
    ideal_bytes: int
    padding_bytes: int = 0


def _sub(a: list[int], b: list[int] | None) -> list[int]:
    """``a - b``, ``b`` padded with zeros (a shard's per-shard counts grow when expert shards are added)."""
    b = b or []
    return [x - (b[i] if i < len(b) else 0) for i, x in enumerate(a)]


def _add(a: list[int] | None, b: list[int]) -> list[int]:
    return list(b) if a is None else plus(a, b)


def _fit(counts: list[int] | None, n: int) -> list[int]:
    """The first ``n`` counts, zeros added: the expert shards in force (those that went are left out)."""
    counts = list(counts or [])[:n]
    return counts + [0] * (n - len(counts))


@dataclass
class ExpertLoadWindow:
    """Deltas of the summed snapshots of all attention shards, kept for ``horizon_s`` seconds."""

    num_experts: int
    num_shards: int
    max_k: int
    horizon_s: float = 3600.0
    deltas: deque = field(default_factory=deque)
    last: dict[int, dict] = field(default_factory=dict)  # attention shard -> its last cumulative snapshot

    def update(self, shard: int, snapshot: dict, now: float | None = None) -> LoadDelta | None:
        """Record a shard's cumulative ``DispatchStats.as_dict()``; returns what changed since its last one."""
        if not snapshot:
            return None
        now = time.time() if now is None else now
        prev = self.last.get(shard, {})
        if snapshot.get("a2a_bytes", 0) < prev.get("a2a_bytes", 0):
            prev = {}  # the shard was replaced after a fault: its counters started again from zero
        self.last[shard] = snapshot
        prev_experts = prev.get("tokens_per_expert", {})
        delta = LoadDelta(
            time=now,
            tokens_per_expert={int(k): _sub(v, prev_experts.get(k)) for k, v in snapshot["tokens_per_expert"].items()},
            tokens_per_shard=_sub(snapshot["tokens_per_shard"], prev.get("tokens_per_shard")),
            pairs_per_shard=_sub(snapshot.get("pairs_per_shard") or [], prev.get("pairs_per_shard")),
            devices_histogram=_sub(snapshot["devices_histogram"], prev.get("devices_histogram")),
            a2a_bytes=snapshot["a2a_bytes"] - prev.get("a2a_bytes", 0),
            ideal_bytes=snapshot["ideal_bytes"] - prev.get("ideal_bytes", 0),
            padding_bytes=snapshot.get("a2a_padding_bytes", 0) - prev.get("a2a_padding_bytes", 0),
        )
        if any(delta.tokens_per_shard) or any(any(v) for v in delta.tokens_per_expert.values()):
            self.deltas.append(delta)
        while self.deltas and self.deltas[0].time < now - self.horizon_s:
            self.deltas.popleft()
        return delta

    def summary(self, window_s: float, now: float | None = None, top: int = 10) -> dict:
        """Everything recorded in the last ``window_s`` seconds, with imbalance and the hottest experts."""
        now = time.time() if now is None else now
        experts: dict[int, list[int]] = {}
        shards = pairs = devices = None
        a2a = ideal = padding = 0
        for d in self.deltas:
            if d.time < now - window_s:
                continue
            for layer, counts in d.tokens_per_expert.items():
                experts[layer] = _add(experts.get(layer), counts)
            shards, devices = _add(shards, d.tokens_per_shard), _add(devices, d.devices_histogram)
            pairs = _add(pairs, d.pairs_per_shard)
            a2a, ideal, padding = a2a + d.a2a_bytes, ideal + d.ideal_bytes, padding + d.padding_bytes
        shards, pairs = _fit(shards, self.num_shards), _fit(pairs, self.num_shards)
        devices = devices or [0] * (self.max_k + 1)
        layers = sorted(experts)
        hottest = sorted(((counts[e], layer, e) for layer, counts in experts.items() for e in range(len(counts))),
                         reverse=True)[:top]
        num_tokens = sum(devices)  # (token, MoE layer) pairs routed
        return {
            "window_s": window_s, "num_experts": self.num_experts, "num_shards": self.num_shards,
            "layers": layers, "num_tokens": num_tokens,
            "tokens_per_expert": {str(layer): experts[layer] for layer in layers},
            "tokens_per_shard": shards,
            "imbalance_per_layer": {str(layer): round(imbalance(experts[layer]), 4) for layer in layers},
            "shard_imbalance": round(imbalance(shards), 4),
            # what each expert shard computed ((token, expert) pairs), and its max over mean: the slowest shard's
            # share of the experts' work, which expert load balancing lowers
            "pairs_per_shard": pairs, "shard_work_imbalance": round(imbalance(pairs), 4),
            "devices_histogram": devices,
            "mean_devices_per_token": round(sum(n * c for n, c in enumerate(devices)) / sum(devices), 4)
            if sum(devices) else 0.0,
            "hottest_experts": [{"layer": layer, "expert": e, "tokens": n} for n, layer, e in hottest if n],
            # the bytes moved, those the routing needed, and those padded blocks added (a2a = ideal + padding)
            "a2a_bytes": a2a, "ideal_bytes": ideal, "a2a_padding_bytes": padding,
        }


@dataclass
class RequestTimes:
    arrival: float
    last: float | None = None  # when its last tokens arrived

    def on_output(self, now: float, num_new_tokens: int) -> tuple[float | None, float | None]:
        """``(ttft, per-token inter-token latency)``: one of them, for an output that carried tokens."""
        if num_new_tokens == 0:
            return None, None
        if self.last is None:
            self.last = now
            return now - self.arrival, None
        itl = (now - self.last) / num_new_tokens
        self.last = now
        return None, itl
