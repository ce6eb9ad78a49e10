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
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from latentmoe.loadtest.local_server import LocalServer, rss_mib

ROOT = Path(__file__).resolve().parents[1]


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


def measure(src: Path | None, extra: list[str]) -> dict:
    home = Path(tempfile.mkdtemp(prefix="lm-mem-home-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=tempfile.mkdtemp(prefix="lmm", dir="/tmp"))
    if src is None:
        server = LocalServer(env, *extra)
    else:  # an older checkout: its own package first on the path; its default GCS port
        env["PYTHONPATH"] = str(src)
        server = LocalServer(env, *extra, command=(sys.executable, "-m", "latentmoe.cli"), own_ray_port=False)
    try:
        ready_s = server.wait_ready(timeout=400, request_timeout=3)
        server.complete(max_tokens=16)
        time.sleep(10)
        by_kind: dict[str, list[int]] = defaultdict(list)
        for pid in server.pids():
            by_kind[kind_of(pid)].append(pid)
        by_kind_mib = {k: rss_mib(pids) for k, pids in sorted(by_kind.items())}
        return {"ready_s": round(ready_s, 1), "processes": sum(len(v) for v in by_kind.values()),
                "rss_mib": round(sum(by_kind_mib.values()), 1),
                "by_kind_mib": {k: round(v, 1) for k, v in by_kind_mib.items()}}
    finally:
        server.stop()


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
