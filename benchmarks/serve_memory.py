"""Resident memory of everything `latentmoe serve` runs: the CLI, the Ray nodes it starts, Serve, the shards.

    python benchmarks/serve_memory.py [--src DIR] [--runs 2] [-- extra serve args, e.g. --no-ray-dashboard]

Starts ``latentmoe serve`` on the built-in tiny model with a HOME and Ray temp directory of its own (so no
other Ray on the machine is joined) and a marker in its environment, waits until it answers a completion,
waits 10 s more, then sums the RSS of every process that carries the marker (each Ray process inherits it),
by kind. ``--src`` runs the CLI of another checkout (an older commit's worktree) with this virtualenv, for a
before/after comparison in one run. Saves results/serve_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]


def marked(mark: str) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if mark.encode() in Path(entry.path, "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def kind_of(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    for key in ("gcs_server", "raylet", "dashboard.py", "dashboard/agent.py", "log_monitor", "monitor.py",
                "runtime_env/agent", "ray.util.client.server", "latentmoe serve", "cli.py serve"):
        if key in cmd:
            return key
    return comm if comm.startswith("ray::") else ("worker " + comm)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(src: Path | None, extra: list[str]) -> dict:
    home = Path(tempfile.mkdtemp(prefix="lm-mem-home-"))
    mark = f"LATENTMOE_MEM_MARK={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=tempfile.mkdtemp(prefix="lmm", dir="/tmp"),
               LATENTMOE_MEM_MARK=mark.split("=", 1)[1])
    http = 18000 + os.getpid() % 1000
    args = ["--http-port", str(http), "--grpc-port", str(http + 1000)]
    if src is None:
        cmd = [str(Path(sys.executable).parent / "latentmoe"), "serve", *args, "--ray-port", str(http + 2000), *extra]
    else:  # an older checkout: its own package first on the path; its default GCS port
        env["PYTHONPATH"] = str(src)
        cmd = [sys.executable, "-m", "latentmoe.cli", "serve", *args, *extra]
    log = open(home / "serve.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    start = time.time()
    try:
        while True:
            if proc.poll() is not None or time.time() - start > 400:
                log.seek(0)
                raise RuntimeError(f"serve did not come up:\n{log.read()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        ready_s = time.time() - start
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": "The experts of a mixture", "max_tokens": 16})
        assert r.status_code == 200, r.text
        time.sleep(10)
        by_kind: dict[str, list[int]] = defaultdict(list)
        for pid in marked(mark):
            by_kind[kind_of(pid)].append(rss_kib(pid))
        total = sum(sum(v) for v in by_kind.values())
        return {"ready_s": round(ready_s, 1), "processes": sum(len(v) for v in by_kind.values()),
                "rss_mib": round(total / 1024, 1),
                "by_kind_mib": {k: round(sum(v) / 1024, 1) for k, v in sorted(by_kind.items())}}
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(3)
        for pid in marked(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="another checkout to measure (its latentmoe package)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_memory.json")
    parser.add_argument("extra", nargs="*", help="extra `latentmoe serve` arguments (after --)")
    args = parser.parse_args()
    runs = [measure(args.src, args.extra) for _ in range(args.runs)]
    for run in runs:
        print(json.dumps(run))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"src": str(args.src or ROOT), "extra": args.extra, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
