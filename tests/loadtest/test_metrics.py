"""Aggregation on synthetic per-request timings: percentiles, ITL spreading, throughput, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentmoe.loadtest.metrics import (RequestResult, itl_samples, request_itls, stats, summarize,
                                        summarize_expert_load, timeseries, tokens_per_chunk)


def test_stats_by_hand():
    s = stats([i / 1000 for i in range(1, 101)])  # 1 .. 100 ms
    assert s["count"] == 100 and s["min"] == pytest.approx(1) and s["max"] == pytest.approx(100)
    assert s["mean"] == pytest.approx(50.5)
    # linear interpolation between order statistics: rank (n - 1) p / 100
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert stats([2.0, 4.0], scale=1.0)["std"] == pytest.approx(1.0)
    assert stats([]) == {"count": 0, "mean": None, "std": None, "min": None, "p50": None, "p90": None,
                         "p99": None, "max": None}
    assert stats([None, 0.003])["count"] == 1


def test_known_chunk_counts_spread_each_gap_over_its_tokens():
    times = [1.0, 1.1, 1.4, 1.5]  # chunk 2 held 3 tokens: its 0.3 s gap is 3 samples of 0.1 s
    counts = tokens_per_chunk(times, [1, 1, 3, 1], 6)
    assert counts == [1, 1, 3, 1]
    assert itl_samples(times, counts) == pytest.approx([0.1] * 5)


def test_unknown_chunk_counts_give_the_extra_tokens_to_the_longest_gaps():
    times = [0.0, 1.0, 2.0, 4.0, 5.0]  # the 2 s gap hides two tokens
    assert tokens_per_chunk(times, None, 6) == [1, 1, 1, 2, 1]
    assert itl_samples(times, [1, 1, 1, 2, 1]) == pytest.approx([1.0] * 5)
    assert tokens_per_chunk(times, None, None) == [1] * 5  # no usage: one token per chunk
    assert tokens_per_chunk(times, None, 3) == [1] * 5  # fewer tokens than chunks: trust the chunks
    assert tokens_per_chunk([0.5], None, 7) == [7]  # everything in one chunk: no ITL samples
    assert itl_samples([0.5], [7]) == []
    assert tokens_per_chunk([], None, 4) == []


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=30), extra=st.integers(0, 100))
def test_spread_conserves_tokens_and_time(gaps, extra):
    times = list(np.cumsum([0.25, *gaps]))
    num_tokens = len(times) + extra
    counts = tokens_per_chunk(times, None, num_tokens)
    assert sum(counts) == num_tokens and counts[0] == 1 and min(counts) >= 1
    samples = itl_samples(times, counts)
    assert len(samples) == num_tokens - 1  # one sample per output token after the first
    assert sum(samples) == pytest.approx(times[-1] - times[0], abs=1e-9)


def result(index, start, chunk_times, end, num_output, chunk_tokens=None, num_input=10, max_tokens=None, **kw):
    return RequestResult(index, start, end, list(chunk_times), chunk_tokens, num_input, num_output,
                         max_tokens if max_tokens is not None else num_output, "length", **kw)


def test_request_figures():
    r = result(0, 1.0, [1.5, 1.6, 1.8], 1.9, 3)
    assert r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(0.9)
    assert r.tpot == pytest.approx(0.15) and np.mean(request_itls(r)) == pytest.approx(r.tpot)
    no_stream = result(1, 0.0, [], 2.0, 8)
    assert no_stream.ttft is None and no_stream.tpot is None and no_stream.e2e == 2.0
    failed = RequestResult(2, 0.0, 0.3, [0.1], status="503", error="full")
    assert not failed.ok and failed.ttft is None and failed.e2e is None and request_itls(failed) == []
    d = r.to_dict()
    assert d["ok"] and d["num_chunks"] == 3 and "chunk_times" not in d and d["ttft"] == pytest.approx(0.5)


def test_summarize():
    results = [result(0, 0.0, [0.1, 0.2, 0.3, 0.4], 0.4, 4, chunk_tokens=[1, 1, 1, 1], num_input=12),
               result(1, 0.0, [0.3, 0.5], 0.6, 3, num_input=20, max_tokens=4),  # HTTP: 2 chunks held 3 tokens
               RequestResult(2, 0.1, 0.2, status="503", error="the engine is full"),
               RequestResult(3, 0.1, 0.25, status="503", error="the engine is full"),
               RequestResult(4, 0.2, 0.3, status="ReadTimeout", error="timed out")]
    s = summarize(results, duration=2.0)
    assert (s["num_requests"], s["num_completed"], s["num_errors"]) == (5, 2, 3)
    assert s["error_rate"] == pytest.approx(0.6)
    assert s["errors"] == {"503: the engine is full": 2, "ReadTimeout: timed out": 1}
    assert s["errors_by_status"] == {"503": 2, "ReadTimeout": 1}
    assert s["num_short_outputs"] == 1
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (32, 7)  # completed requests only
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_token_throughput"] == pytest.approx(3.5) and s["input_token_throughput"] == pytest.approx(16)
    assert s["ttft_ms"]["count"] == 2 and s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["e2e_ms"]["p50"] == pytest.approx(500)
    # ITL: 3 samples of 100 ms from request 0, 2 samples of 100 ms from request 1 (one 200 ms gap, 2 tokens)
    assert s["itl_ms"]["count"] == 5 and s["itl_ms"]["mean"] == pytest.approx(100)
    assert s["tpot_ms"]["mean"] == pytest.approx(100)
    assert s["output_tokens"]["mean"] == pytest.approx(3.5)
    empty = summarize([], 0.0)
    assert empty["num_requests"] == 0 and empty["error_rate"] == 0 and empty["request_throughput"] is None


def test_timeseries_conserves_tokens_and_counts():
    results = [result(0, 0.0, [0.5, 1.5, 2.5], 2.6, 3, chunk_tokens=[1, 1, 1]),
               result(1, 1.0, [], 3.5, 5),  # not streamed: its tokens land at its end
               RequestResult(2, 0.2, 0.4, status="503", error="full")]
    series = timeseries(results, duration=4.0, num_bins=4)
    assert series["bin_s"] == 1.0 and series["t"] == [0.0, 1.0, 2.0, 3.0]
    assert series["output_tokens_per_s"] == [1.0, 1.0, 1.0, 5.0]
    assert series["completed_per_s"] == [0, 0, 1, 1] and series["failed_per_s"] == [1, 0, 0, 0]
    assert series["in_flight"] == [1, 2, 2, 1]  # at each bin's start: request 2 ran inside bin 0 only
    assert timeseries(results, duration=50.0)["bin_s"] == 1.0  # by default one-second bins ...
    assert timeseries(results, duration=4.0)["bin_s"] == pytest.approx(0.2)  # ... at least 20 ...
    assert timeseries(results, duration=400.0)["bin_s"] == pytest.approx(4.0)  # ... at most 100
    series = timeseries(results, duration=4.0)
    assert sum(series["output_tokens_per_s"]) * series["bin_s"] == pytest.approx(8)


LOAD = {"window_s": 30, "num_tokens": 120, "layers": [1, 2], "num_experts": 4, "num_shards": 2,
        "tokens_per_expert": {"1": [10, 20, 30, 60], "2": [30, 30, 30, 30]}, "tokens_per_shard": [90, 150],
        "imbalance_per_layer": {"1": 2.0, "2": 1.0}, "shard_imbalance": 1.25, "devices_histogram": [0, 80, 40],
        "hottest_experts": [{"layer": 1, "expert": 3, "tokens": 60}], "a2a_bytes": 300, "ideal_bytes": 200}


def test_expert_load_summary():
    e = summarize_expert_load(LOAD)
    assert e["imbalance_per_layer"] == {"1": 2.0, "2": 1.0}
    assert e["max_layer_imbalance"] == 2.0 and e["mean_layer_imbalance"] == 1.5
    assert e["mean_devices_per_token"] == pytest.approx((80 + 2 * 40) / 120)
    assert e["a2a_over_ideal"] == pytest.approx(1.5)
    assert e["hottest_experts"] == [{"layer": 1, "expert": 3, "tokens": 60}]
    bare = summarize_expert_load({})  # fields the server leaves out are None, not errors
    assert bare["mean_devices_per_token"] is None and bare["max_layer_imbalance"] is None
    assert bare["placement_version"] is None and bare["placement_changes"] == []


def test_placement_changes_of_the_run():
    """Only the changes applied since the run started count (the server lists its latest few)."""
    rebalances = [{"time": 90.0, "version": 1, "changed": True, "imbalance_before": 1.8, "total_s": 0.3},
                  {"time": 110.0, "version": 1, "changed": False, "reason": "not worth a switch"},
                  {"time": 120.0, "kind": "rebalance", "version": 2, "changed": True, "imbalance_before": 1.5,
                   "imbalance_predicted": 1.1, "copies": 4, "total_s": 0.2},
                  {"time": 130.0, "kind": "expert_shards", "version": 3, "changed": True, "expert_shards_before": 2,
                   "expert_shards": 4, "copies": 0, "total_s": 6.5}]
    load = LOAD | {"placement": {"version": 3, "num_copies": 0, "rebalances": rebalances}}
    e = summarize_expert_load(load, since=100.0)
    assert e["placement_version"] == 3 and e["placement_copies"] == 0
    none = dict.fromkeys(("expert_shards_before", "expert_shards"))
    assert e["placement_changes"] == [
        {"time": 120.0, "kind": "rebalance", "version": 2, "imbalance_before": 1.5, "imbalance_predicted": 1.1,
         "copies": 4, "total_s": 0.2} | none,
        {"time": 130.0, "kind": "expert_shards", "version": 3, "imbalance_before": None, "imbalance_predicted": None,
         "expert_shards_before": 2, "expert_shards": 4, "copies": 0, "total_s": 6.5}]
    assert [c["version"] for c in summarize_expert_load(load)["placement_changes"]] == [1, 2, 3]
    from latentmoe.loadtest.report import _placement_change

    assert [_placement_change(c) for c in e["placement_changes"]] == [
        "v2 (imbalance 1.50 -> 1.10, 0.20 s)", "v3 (2 -> 4 expert shards, 6.50 s)"]
