"""What a run measured, from per-request timings: latency statistics, throughput, errors.

Plain functions over ``RequestResult`` lists; no network, no clock. Times are seconds from the start
of the run; summaries are in milliseconds. Percentiles are numpy's (linear interpolation), as in
vLLM's serving benchmark.

Inter-token latency (ITL) is counted per output token: the gap between two content chunks is spread
evenly over the tokens the later chunk carries, so a request of N tokens whose first chunk holds one
token gives N - 1 samples that sum to (last chunk - first chunk). Where the wire does not say how many
tokens a chunk holds (OpenAI SSE) but the usage gives the total, each chunk is taken to hold one token
and the tokens left over go, one at a time, to the gap that is longest per token (a chunk that holds
two tokens waited for two decode steps). TPOT is the same per request: (E2E - TTFT) / (N - 1).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as the client saw it. ``chunk_times`` are the arrival times of the chunks that carried
    output (content text on HTTP, token ids on gRPC), ``chunk_tokens`` how many tokens each held (None where
    the wire does not say). ``error`` is None for a success."""

    index: int
    start: float  # sent, seconds from the start of the run
    end: float = 0.0  # response complete
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] | None = None
    num_input_tokens: int | None = None  # from the server's usage
    num_output_tokens: int | None = None
    max_tokens: int = 0  # asked for
    finish_reason: str | None = None
    status: str = "ok"  # "ok", an HTTP status ("503"), a gRPC code ("RESOURCE_EXHAUSTED") or an exception name
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times and self.ok else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.start if self.ok else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None without a stream or with one token."""
        n = self.num_output_tokens
        if self.ttft is None or not n or n < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (n - 1)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("chunk_times", "chunk_tokens")}
        d.update(ok=self.ok, ttft=self.ttft, e2e=self.e2e, tpot=self.tpot, num_chunks=len(self.chunk_times))
        return d


def tokens_per_chunk(chunk_times: list[float], chunk_tokens: list[int] | None,
                     num_output_tokens: int | None) -> list[int]:
    """How many tokens each chunk held: ``chunk_tokens`` when known, else the estimate of the module
    docstring (one each, the rest to the gaps longest per token). Sums to ``num_output_tokens`` when
    that is known and at least the number of chunks."""
    num_chunks = len(chunk_times)
    if chunk_tokens is not None:
        assert len(chunk_tokens) == num_chunks, (len(chunk_tokens), num_chunks)
        return list(chunk_tokens)
    counts = [1] * num_chunks
    extra = (num_output_tokens or 0) - num_chunks
    if extra <= 0 or num_chunks == 0:
        return counts
    if num_chunks == 1:
        return [num_output_tokens]
    gaps = np.diff(np.asarray(chunk_times, dtype=float))  # [C - 1], gap i ends at chunk i + 1
    per_token = gaps.copy()
    if extra >= len(gaps):  # hand out whole rounds in one go, in proportion to the gap
        share = np.floor(gaps / gaps.sum() * extra).astype(int) if gaps.sum() > 0 else np.zeros(len(gaps), int)
        for i, k in enumerate(share):
            counts[i + 1] += int(k)
            per_token[i] = gaps[i] / counts[i + 1]
        extra -= int(share.sum())
    for _ in range(extra):
        i = int(np.argmax(per_token))
        counts[i + 1] += 1
        per_token[i] = gaps[i] / counts[i + 1]
    return counts


def itl_samples(chunk_times: list[float], counts: list[int]) -> list[float]:
    """Per-token inter-token latencies: the gap before chunk i, divided evenly over its ``counts[i]`` tokens.
    Tokens in the first chunk beyond the first have no sample (they arrived at TTFT)."""
    samples = []
    for i in range(1, len(chunk_times)):
        k = counts[i]
        if k > 0:
            samples += [(chunk_times[i] - chunk_times[i - 1]) / k] * k
    return samples


def request_itls(r: RequestResult) -> list[float]:
    if not r.ok or not r.chunk_times:
        return []
    return itl_samples(r.chunk_times, tokens_per_chunk(r.chunk_times, r.chunk_tokens, r.num_output_tokens))


def stats(values: list[float] | np.ndarray, scale: float = 1000.0) -> dict:
    """``{count, mean, std, min, p50, p90, p99, max}`` of ``values`` times ``scale`` (s -> ms by default);
    every figure is None for no values."""
    values = np.asarray([v for v in values if v is not None], dtype=float) * scale
    keys = ["mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max"]
    if values.size == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    figures = [values.mean(), values.std(), values.min(), *np.percentile(values, PERCENTILES), values.max()]
    return {"count": int(values.size), **{k: float(v) for k, v in zip(keys, figures)}}


def error_key(r: RequestResult) -> str:
    return f"{r.status}: {r.error}"


def summarize(results: list[RequestResult], duration: float) -> dict:
    """The run's figures, as llmperf and vLLM's ``benchmark_serving`` report them.

    ``duration`` is the wall time of the run (first request sent to last response complete); throughputs
    count completed requests and the tokens of completed requests only."""
    assert duration >= 0, duration
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    num_input = sum(r.num_input_tokens or 0 for r in done)
    num_output = sum(r.num_output_tokens or 0 for r in done)
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    return {
        "num_requests": len(results),
        "num_completed": len(done),
        "num_errors": len(failed),
        "error_rate": len(failed) / len(results) if results else 0.0,
        "errors": dict(Counter(error_key(r) for r in failed).most_common()),
        "errors_by_status": dict(Counter(r.status for r in failed).most_common()),
        "num_short_outputs": sum(1 for r in done if r.num_output_tokens is not None and
                                 r.num_output_tokens < r.max_tokens),
        "duration_s": duration,
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": per_second(len(done)),
        "input_token_throughput": per_second(num_input),
        "output_token_throughput": per_second(num_output),
        "total_token_throughput": per_second(num_input + num_output),
        "ttft_ms": stats([r.ttft for r in done]),
        "tpot_ms": stats([r.tpot for r in done]),
        "itl_ms": stats([x for r in done for x in request_itls(r)]),
        "e2e_ms": stats([r.e2e for r in done]),
        "input_tokens": stats([r.num_input_tokens for r in done], scale=1.0),
        "output_tokens": stats([r.num_output_tokens for r in done], scale=1.0),
    }


def timeseries(results: list[RequestResult], duration: float, num_bins: int | None = None) -> dict:
    """Throughput over time in ``num_bins`` equal bins: output tokens/s (each chunk's tokens at its arrival,
    a non-streamed response's at its end), completed and failed requests/s, and requests in flight at each
    bin's start."""
    if num_bins is None:  # one-second bins, at least 20 and at most 100 of them
        num_bins = int(min(100, max(20, math.ceil(duration))))
    width = max(duration, 1e-9) / num_bins
    edges = np.arange(num_bins + 1) * width  # [B + 1]
    tokens = np.zeros(num_bins)
    completed, failed, in_flight = np.zeros(num_bins), np.zeros(num_bins), np.zeros(num_bins)

    def bin_of(t: float) -> int:
        return min(num_bins - 1, max(0, int(t / width)))

    for r in results:
        if r.ok:
            completed[bin_of(r.end)] += 1
            if r.chunk_times:
                for t, k in zip(r.chunk_times, tokens_per_chunk(r.chunk_times, r.chunk_tokens, r.num_output_tokens)):
                    tokens[bin_of(t)] += k
            else:
                tokens[bin_of(r.end)] += r.num_output_tokens or 0
        else:
            failed[bin_of(r.end)] += 1
        in_flight += (r.start <= edges[:-1]) & (edges[:-1] < r.end)
    return {"bin_s": width, "t": edges[:-1].tolist(), "output_tokens_per_s": (tokens / width).tolist(),
            "completed_per_s": (completed / width).tolist(), "failed_per_s": (failed / width).tolist(),
            "in_flight": in_flight.astype(int).tolist()}


def summarize_expert_load(load: dict, since: float | None = None) -> dict:
    """The summary of ``GET /v1/expert-load``: imbalance per layer (max over mean tokens per expert), per
    shard, the hottest experts, devices (expert shards) reached per token (the histogram's index is
    the number of devices), and the expert placement: its version, and the changes applied since ``since``
    (wall time, the run's start) as the server lists them (its latest few)."""
    placement = load.get("placement") or {}
    changes = [r for r in placement.get("rebalances") or []
               if r.get("changed") and (since is None or r.get("time", 0) >= since)]
    histogram = [int(x) for x in load.get("devices_histogram") or []]
    num_tokens = sum(histogram)
    mean_devices = sum(i * n for i, n in enumerate(histogram)) / num_tokens if num_tokens else None
    imbalance = {str(k): float(v) for k, v in (load.get("imbalance_per_layer") or {}).items()}
    a2a, ideal = load.get("a2a_bytes"), load.get("ideal_bytes")
    return {
        "window_s": load.get("window_s"),
        "num_tokens": load.get("num_tokens"),
        "num_experts": load.get("num_experts"),
        "num_shards": load.get("num_shards"),
        "imbalance_per_layer": imbalance,
        "max_layer_imbalance": max(imbalance.values()) if imbalance else None,
        "mean_layer_imbalance": sum(imbalance.values()) / len(imbalance) if imbalance else None,
        "shard_imbalance": load.get("shard_imbalance"),
        "tokens_per_shard": load.get("tokens_per_shard"),
        "hottest_experts": list(load.get("hottest_experts") or [])[:10],
        "devices_histogram": histogram,
        "mean_devices_per_token": mean_devices,
        "a2a_bytes": a2a,
        "ideal_bytes": ideal,
        "a2a_padding_bytes": load.get("a2a_padding_bytes"),  # what padded blocks (decode passes) added
        "a2a_over_ideal": a2a / ideal if isinstance(a2a, (int, float)) and ideal else None,
        "work_imbalance": load.get("shard_work_imbalance"),
        "placement_version": placement.get("version"),
        "placement_copies": placement.get("num_copies"),
        # rebalances, and changes of the number of expert shards (kind "expert_shards")
        "placement_changes": [{k: r.get(k) for k in ("time", "kind", "version", "imbalance_before",
                                                     "imbalance_predicted", "expert_shards_before", "expert_shards",
                                                     "copies", "total_s")} for r in changes],
    }
