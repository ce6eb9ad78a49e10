"""benchmarks/gpu_check.py, the prepared GPU check, at CPU sizes: its comparison of a bf16 engine with the fp32
engine on the same weights runs and reports, and a part that cannot run here fails in the report, not silently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, timeout=300)


def test_engine_part_at_cpu_sizes(tmp_path):
    proc = _run(tmp_path, "--only", "engine", "--small", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    engine = report["parts"]["engine"]
    assert report["ok"] and engine["ok"] and engine["device"] == "cpu"
    diff = engine["prompt_logprob_abs_diff"]
    # bf16 against fp32: close but not equal (equal would mean one side did not run in its own precision)
    assert 0 < diff["mean"] < 0.05 and diff["n"] > 100, diff
    assert engine["throughput"]["output_tok_s"] > 0
    assert "gpu_check summary" in proc.stdout and "engine   ok" in proc.stdout


def test_a_part_that_cannot_run_fails_in_the_report(tmp_path):
    proc = _run(tmp_path, "--only", "nccl", "--small")
    assert proc.returncode == 1
    nccl = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["nccl"]
    assert nccl["ok"] is False and "no CUDA device" in nccl.get("error", "") + nccl.get("log_tail", "")
    assert "nccl     FAILED" in proc.stdout


def test_unknown_part_is_refused(tmp_path):
    proc = _run(tmp_path, "--only", "engine,warp")
    assert proc.returncode == 2 and "unknown parts ['warp']" in proc.stderr
