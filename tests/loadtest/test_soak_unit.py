"""The soak test's pieces that need no server: process titles, the memory sampler, counting and the verdict."""

from __future__ import annotations

import os

import pytest

from latentmoe import LLM
from latentmoe.loadtest.soak import (POOL, Tally, _psutil, cluster_pids, expected_outputs, memory_report,
                                     ray_process_title, sample_memory, total_mib, verdict)


@pytest.mark.parametrize("cmdline,title", [
    (["ray::ExpertShardActor"], "ray::ExpertShardActor"),
    (["ray::ExpertShardActor.assign()"], "ray::ExpertShardActor"),
    (["ray::Coordinator.watch"], "ray::Coordinator"),
    (["ray::ServeReplica:latentmoe:LatentMoEServer"], "ray::ServeReplica:latentmoe:LatentMoEServer"),
    (["ray::ProxyActor", "", ""], "ray::ProxyActor"),
    (["ray::IDLE"], None),  # pooled workers come and go on Ray's own schedule
    (["ray::IDLE_SpillWorker"], None),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"],
     "raylet"),
    (["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "--port=6379"], "gcs_server"),
    (["/usr/bin/python3", "-m", "pytest"], None),
    ([], None),
])
def test_ray_process_title(cmdline, title):
    assert ray_process_title(cmdline) == title


def test_sample_memory_finds_this_process():
    own = _psutil().Process().cmdline()
    sample = sample_memory(lambda cmdline, name: "me" if cmdline == own else None)
    assert "me" in sample and os.getpid() in sample["me"]["pids"], sample
    assert 10 < sample["me"]["rss_mib"] < 1e6  # this process holds torch: tens of MiB at least
    assert total_mib(sample) == pytest.approx(sample["me"]["rss_mib"])
    assert sample_memory(lambda cmdline, name: None) == {}


def _cluster(session: str, gcs_port: int, base: int, driver: int) -> list[tuple[int, int, list[str]]]:
    """The process table of a one-machine Ray cluster as ray.cluster_utils.Cluster starts it (real flags)."""
    root = f"/tmp/ray/{session}"
    return [
        (base, driver, [".../gcs_server", f"--log_dir={root}/logs", "--gcs_server_port=0"]),
        (base + 1, driver, [".../raylet", f"--raylet_socket_name={root}/sockets/raylet",
                            f"--python_worker_command=python default_worker.py --gcs-address=192.0.2.2:{gcs_port} "
                            f"--session-name={session} RAY_WORKER_DYNAMIC_OPTION_PLACEHOLDER",
                            f"--gcs-address=192.0.2.2:{gcs_port}"]),
        (base + 2, base + 1, ["ray::DashboardAgent"]),
        (base + 3, base + 1, ["ray::ShardActor"]),
        (base + 4, base + 3, ["some-child-of-a-worker"]),
        (base + 5, driver, [".../raylet", f"--raylet_socket_name={root}/sockets/raylet.1",
                            f"--gcs-address=192.0.2.2:{gcs_port}"]),
        (base + 6, base + 5, ["ray::ShardActor.step()"]),
    ]


def test_cluster_pids_keeps_one_cluster_of_two():
    ours = _cluster("session_2026-11-23_19-03-28_100000_7580", 33225, 100, driver=7580)
    theirs = _cluster("session_2026-11-23_19-07-53_697509_11420", 332, 200, driver=11420)
    table = [(7580, 1, ["python", "benchmarks/soak.py"]), (11420, 1, ["python", "-m", "pytest"]), *ours, *theirs]
    assert cluster_pids(table, 33225) == {pid for pid, _, _ in ours}  # port 332 is not a prefix match of 33225
    assert cluster_pids(table, 332) == {pid for pid, _, _ in theirs}
    assert cluster_pids(table, 6379) == set()


def test_memory_report_groups_by_title_and_sees_restarts():
    start = {"ray::ShardActor": {"rss_mib": 300.0, "pids": [10, 11]}, "raylet": {"rss_mib": 100.0, "pids": [5]}}
    end = {"ray::ShardActor": {"rss_mib": 340.0, "pids": [10, 12]}, "raylet": {"rss_mib": 110.0, "pids": [5]},
           "ray::ProxyActor": {"rss_mib": 50.0, "pids": [20]}}
    m = memory_report(start, end, max_mib=520.0, num_samples=7, bound_mib=200.0)
    assert (m["start_mib"], m["end_mib"], m["max_mib"], m["growth_mib"]) == (400.0, 500.0, 520.0, 100.0)
    assert m["growth_pct"] == 25.0 and m["num_samples"] == 7 and m["bound_mib"] == 200.0
    assert m["processes"]["ray::ShardActor"] == {"start_mib": 300.0, "end_mib": 340.0, "num_start": 2,
                                                 "num_end": 2}
    assert m["processes"]["ray::ProxyActor"]["num_start"] == 0
    assert m["restarted"] == ["ray::ProxyActor", "ray::ShardActor"]
    assert memory_report({}, {}, 0.0, 1, 200.0)["growth_pct"] is None


def test_tally_counts_outcomes_latency_and_keeps_the_first_errors():
    tally = Tally()
    tally.record("good", "http_completion", "ok", 0.5)
    tally.record("good", "grpc_stream", "ok", 1.5)
    tally.record("disconnect", "http_stream", "ended_early", 0.1)  # not an error
    for i in range(30):
        tally.record("bad", "http_wrong_type", "unexpected_status:500", 0.01, f"error {i}", at_s=i)
    assert tally.requests["good"] == {"http_completion": {"ok": 1}, "grpc_stream": {"ok": 1}}
    assert tally.outcomes("good") == {"ok": 2} and tally.outcomes("bad") == {"unexpected_status:500": 30}
    assert tally.num_errors == 30 and len(tally.errors) == 20 and tally.errors[0]["detail"] == "error 0"
    latency = tally.latency_report()
    assert latency["good"] == {"count": 2, "mean_s": 1.0, "sum_s": 2.0, "max_s": 1.5}


def _report(requests=None, cache=None, health=None, growth=10.0, bound=200.0, available=True) -> dict:
    return {
        "requests": requests if requests is not None else {
            "good": {"http_completion": {"ok": 5}}, "bad": {"http_too_big": {"ok": 2}},
            "disconnect": {"grpc_stream": {"ok": 1, "ended_early": 1}}},
        "cache_at_end": cache if cache is not None else {"num_blocks": 128, "num_free_blocks": 128,
                                                          "num_running": 0, "num_waiting": 0},
        "health_at_end": health if health is not None else {"status": "ok", "live_requests": 0},
        "memory": {"available": available, "bound_mib": bound, "growth_mib": growth, "start_mib": 1000.0,
                   "end_mib": 1000.0 + growth},
    }


def test_verdict_passes_a_clean_run():
    assert verdict(_report()) == []
    assert verdict(_report(growth=500.0, available=False)) == []  # not measured: nothing to judge


@pytest.mark.parametrize("report,reason", [
    (_report(requests={"good": {"http_chat": {"ok": 3, "wrong_output": 1}}}), "1 good request(s)"),
    (_report(requests={"good": {"http_chat": {"ok": 3}}, "bad": {"grpc_empty_prompt": {"unexpected_status:OK": 2}}}),
     "unexpected_status:OK x2"),
    (_report(requests={"good": {"grpc_generate": {"ok": 3}},
                       "disconnect": {"http_stream": {"exception:ReadError": 1}}}), "1 disconnect request(s)"),
    (_report(requests={"bad": {"http_too_big": {"ok": 3}}}), "no good request"),
    (_report(cache={"num_blocks": 128, "num_free_blocks": 120, "num_running": 0, "num_waiting": 0}),
     "8 of 128 blocks in use"),
    (_report(cache={"num_blocks": 128, "num_free_blocks": 128, "num_running": 1, "num_waiting": 0}), "1 running"),
    (_report(cache={"error": "ConnectError: refused"}), "could not be read"),
    (_report(health={"status": "ok", "live_requests": 2}), "live requests"),
    (_report(growth=250.0), "more than the bound of 200 MiB"),
])
def test_verdict_names_each_failure(report, reason):
    failures = verdict(report)
    assert len(failures) == 1 and reason in failures[0], failures


def test_expected_outputs_cover_the_pool(tiny_dir):
    expected = expected_outputs(LLM(model=str(tiny_dir)))
    assert sorted(expected) == sorted(c.key for c in POOL)
    for case in POOL:
        e = expected[case.key]
        assert 4 <= case.max_tokens <= 16 and 1 <= e["num_tokens"] <= case.max_tokens
        assert e["num_tokens"] == len(e["token_ids"]) and e["finish_reason"] in ("stop", "length")
