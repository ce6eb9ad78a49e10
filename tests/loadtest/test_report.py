"""Report writing from a synthetic run: text summary, result.json, PNGs, one-file HTML; and the CLI's checks."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from latentmoe.loadtest.cli import loadtest
from latentmoe.loadtest.metrics import RequestResult, summarize, summarize_expert_load, timeseries
from latentmoe.loadtest.report import format_summary, write_report
from latentmoe.loadtest.runner import Schedule, Target, config_dict
from latentmoe.loadtest.workload import LengthDist, Workload
from tests.loadtest.test_metrics import LOAD

PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_run(load: dict):
    results = [RequestResult(i, 0.1 * i, 0.1 * i + 1.0, [0.1 * i + 0.2 + 0.1 * k for k in range(8)], None,
                             16, 8, 8, "length") for i in range(12)]
    results.append(RequestResult(12, 0.5, 0.6, status="503", error="the engine is full"))
    duration = max(r.end for r in results)
    config = config_dict(Target(url="http://127.0.0.1:1"), Schedule(request_rate=float("inf"), num_requests=13),
                         Workload(LengthDist(16), LengthDist(8)))
    config["target"]["model"] = "tiny"
    result = {"config": config, "summary": summarize(results, duration), "expert_load": load,
              "timeseries": timeseries(results, duration), "requests": [r.to_dict() for r in results]}
    return result, results


def test_report_with_expert_load(tmp_path):
    result, results = synthetic_run({"available": True, "data": LOAD, "summary": summarize_expert_load(LOAD)})
    files = write_report(result, tmp_path / "out", results)
    names = [p.name for p in files]
    assert names == ["result.json", "ttft.png", "itl.png", "e2e.png", "throughput.png", "expert_load.png",
                     "shard_load.png", "report.html"]
    for p in files:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes().startswith(PNG)
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["files"] == names and saved["summary"]["num_errors"] == 1
    assert saved["config"]["schedule"]["request_rate"] == "inf" and len(saved["requests"]) == 13
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "src=\"ttft.png\"" not in html  # embedded, one file
    assert "503: the engine is full" in html and "hottest experts" in html

    text = format_summary(result)
    for line in ("Requests completed:", "Mean TTFT (ms):", "P99 ITL (ms):", "P90 E2E (ms):",
                 "Output token throughput (tok/s):", "Imbalance per layer (max/mean):", "1: 2.00, 2: 1.00",
                 "L1/E3 (60)", "1 x 503: the engine is full", "Placement changes in the run:"):
        assert line in text, (line, text)


def test_report_without_expert_load(tmp_path):
    reason = "http://x/v1/expert-load is not served (404): the server has no expert-load endpoint"
    result, results = synthetic_run({"available": False, "reason": reason})
    names = [p.name for p in write_report(result, tmp_path, results)]
    assert "expert_load.png" not in names and "shard_load.png" not in names
    assert reason in (tmp_path / "report.html").read_text() and reason in format_summary(result)


def test_cli_rejects_bad_arguments(tmp_path):
    app = typer.Typer()
    app.command()(loadtest)
    runner = CliRunner()
    for args, message in ((["--no-progress"], "either --url"),
                          (["--url", "http://x", "--concurrency", "2", "--request-rate", "3"], "not both"),
                          (["--url", "http://x", "--input-len-range", "9"], "LOW:HIGH"),
                          (["--grpc", "x:1", "--endpoint", "chat"], "no chat endpoint"),
                          (["--url", "http://x", "--prompts-file", str(tmp_path / "none.jsonl")], "No such file")):
        out = runner.invoke(app, args)
        assert out.exit_code == 2 and message in out.output, (args, out.output)


@pytest.mark.parametrize("rate", [None, 5.0])
def test_cli_defaults(rate, monkeypatch):
    seen = {}

    async def fake_run(target, schedule, workload, on_result):
        seen.update(target=target, schedule=schedule, workload=workload)
        result, results = synthetic_run({"available": False, "reason": "test"})
        for r in results:
            on_result(r)  # drives the progress bar
        return result, results

    monkeypatch.setattr("latentmoe.loadtest.runner.run_loadtest", fake_run)
    app = typer.Typer()
    app.command()(loadtest)
    args = ["--url", "http://x"] + (["--request-rate", str(rate)] if rate else [])
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "Mean TTFT (ms):" in out.output and "nothing written" in out.output
    assert "done 13, errors 1" in out.output  # the progress bar's last state
    s = seen["schedule"]
    assert (s.concurrency, s.request_rate, s.num_requests) == ((None, 5.0, 100) if rate else (4, None, 100))
    assert seen["workload"].input_len == LengthDist(128) and seen["target"].ignore_eos and seen["target"].stream
