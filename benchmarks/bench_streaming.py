"""The streaming ceiling: tokens per second delivered to many concurrent short streams, through the whole server.

    python benchmarks/bench_streaming.py [--streams 256] [--max-tokens 32] [--rounds 2] [--src DIR]
                                         [--env KEY=VALUE] [--out results/bench_streaming.json]

Starts ``latentmoe serve`` on the built-in tiny model (``LocalServer``: its own process group, its own Ray
token), opens ``--streams`` SSE completions at once (``stream: true``, ``ignore_eos``, greedy), counts every
token that reaches the client and every SSE event that carried them, and reports tokens/s over the round's wall
time, events per token (1.0: one message per token; lower: several tokens per message), and TTFT / end
percentiles. ``--src`` runs another checkout's ``latentmoe`` (an older commit in a git worktree) for a before /
after comparison on the same machine, back to back. Figures go to stdout and, as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses (the project installs it)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentmoe.loadtest.local_server import LocalServer  # noqa: E402


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start = time.perf_counter()
    first, events, tokens = None, 0, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            body = (await r.aread()).decode(errors="replace")
            try:
                body = json.loads(body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            return {"error": f"HTTP {r.status_code}: {body[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"]["message"]}
            text = event["choices"][0].get("text", "")
            if text:
                events += 1
                first = first or time.perf_counter()
    # the completion's usage is not streamed by default: ask for the tokens by count
    tokens = max_tokens
    return {"ttft": (first or time.perf_counter()) - start, "e2e": time.perf_counter() - start, "events": events,
            "tokens": tokens}


async def round_(url: str, model: str, streams: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, model, [5 + i % 500, 6, 7, 8], max_tokens)
                                         for i in range(streams)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    events = sum(r["events"] for r in ok)

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"streams": streams, "completed": len(ok), "errors": sorted({r["error"] for r in results if "error" in r}),
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "events": events,
            "events_per_token": events / tokens if tokens else None,
            "ttft_p50_s": pct([r["ttft"] for r in ok], 0.5), "ttft_p90_s": pct([r["ttft"] for r in ok], 0.9),
            "e2e_p50_s": pct([r["e2e"] for r in ok], 0.5),
            "e2e_mean_s": statistics.mean(r["e2e"] for r in ok) if ok else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--src", default=None, help="another checkout to run (its .venv or this one's)")
    p.add_argument("--label", default=None)
    p.add_argument("--serve-arg", action="append", default=[], help="an extra `latentmoe serve` argument")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="one more variable in the server's environment (RAY_SERVE_ENABLE_HA_PROXY=0: Serve's proxy "
                        "actor in front instead of HAProxy, the local cluster's default)")
    p.add_argument("--out", default="results/bench_streaming.json")
    args = p.parse_args()

    home, ray_tmp = tempfile.mkdtemp(prefix="lm-stream-home-"), tempfile.mkdtemp(prefix="lmst", dir="/tmp")
    # its own HOME (Ray token, cluster record) and Ray temp dir (no other cluster on this machine is found),
    # removed afterwards
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": home, "RAY_TMPDIR": ray_tmp} | dict(kv.split("=", 1) for kv in args.env)
    command = None
    if args.src:
        src = Path(args.src).resolve()
        env["PYTHONPATH"] = str(src)
        command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "latentmoe.cli"]
    extra = {"command": command, "cwd": Path(args.src).resolve()} if args.src else {}
    server = LocalServer(env, "--no-ray-dashboard", *args.serve_arg, **extra)
    result = {"label": args.label or (f"src={args.src}" if args.src else "this checkout"),
              "loadavg_before": os.getloadavg(), "rounds": []}
    try:
        result["ready_s"] = server.wait_ready(timeout=600)
        server.complete(max_tokens=4)  # warm
        for i in range(args.rounds):
            r = asyncio.run(round_(server.url, server.model_name, args.streams, args.max_tokens))
            result["rounds"].append(r)
            print(f"round {i}: {r['completed']}/{r['streams']} streams, {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['events_per_token']:.2f} events/token, TTFT p50 {r['ttft_p50_s']:.2f} s, "
                  f"end p50 {r['e2e_p50_s']:.2f} s, errors {r['errors']}")
        result["health"] = httpx.get(server.url + "/health", timeout=30).json()
    finally:
        server.stop()
        for d in (home, ray_tmp):
            shutil.rmtree(d, ignore_errors=True)
    result["best_tokens_per_s"] = max(r["tokens_per_s"] for r in result["rounds"]) if result["rounds"] else None
    result["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[result["label"]] = result
    out.write_text(json.dumps(saved, indent=2))
    print(f"best {result['best_tokens_per_s']:.0f} tokens/s; saved {out}")


if __name__ == "__main__":
    main()
