"""A soak test of the server: minutes of mixed load, then a check that nothing leaked.

    python benchmarks/soak.py --start [--duration 180] [--concurrency 3]
    python benchmarks/soak.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:9000 --model-dir DIR [--model NAME]

With ``--start`` it starts a server on this machine on the built-in tiny model (a local Ray cluster of a
head, an attention node and an expert node, Ray Serve with HTTP and gRPC) and stops it at the end;
otherwise it soaks the running server at ``--url`` / ``--grpc``, and ``--model-dir`` must be the checkpoint
it serves (the expected outputs come from the single-process engine on it). Good requests (checked against
those outputs), dropped streams and bad requests are mixed at random (``latentmoe.loadtest.soak``). Prints
the requests by kind and outcome, the errors, the RSS of the Ray processes on this machine at the start and
the end, the cache at the end and the verdict; saves the report as JSON. Exits 1 when the soak fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def local_server(model_dir: str, max_body_bytes: int):
    """The server of tests/actors/test_serve.py on this machine: yields (http_url, grpc_target, model name)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import gRPCOptions

    from latentmoe.actors.cluster import ROUTER_NAMESPACE, stop_coordinator
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_node
    from latentmoe.actors.serve_app import GRPC_SERVICERS, build_app
    from latentmoe.cluster.communicator import free_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, **role_node(ATTENTION_RESOURCE, 1))
    cluster.add_node(num_cpus=2, **role_node(EXPERT_RESOURCE, 2))
    ray.init(address=cluster.address, log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
        serve.run(build_app({"model": model_dir, "served_model_name": "tiny", "attention_shards": 1,
                             "expert_shards": 2, "engine": {"block_size": 16, "num_blocks": 128},
                             "max_num_requests": 8, "max_ongoing_requests": 48, "max_queued_requests": 16,
                             "min_replicas": 1, "max_replicas": 1, "max_body_bytes": max_body_bytes}),
                  name="latentmoe", route_prefix="/")
        yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", "tiny"
    finally:
        serve.shutdown()
        stop_coordinator()
        ray.shutdown()
        cluster.shutdown()


def summary(report: dict) -> str:
    """The report as a few readable lines."""
    lines = [f"soak: {report['num_requests']} requests in {report['duration_s']:.0f} s "
             f"(+{report['num_warmup']} warm-up), concurrency {report['concurrency']}, seed {report['seed']}"]
    for kind, outcomes in report["requests_by_kind"].items():
        lat = report["latency"][kind]
        lines.append(f"  {kind:<10} " + ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items()))
                     + f"   (latency mean {lat['mean_s'] * 1e3:.0f} ms, max {lat['max_s'] * 1e3:.0f} ms)")
    lines.append(f"  errors {report['num_errors']}, overload retries {report['num_overload_retries']}")
    for error in report["errors"][:5]:
        lines.append(f"    {error['kind']}/{error['variant']}: {error['outcome']}: {(error['detail'] or '')[:160]}")
    m = report["memory"]
    if m.get("available"):
        lines.append(f"  RSS of {m['scope']}: start {m['start_mib']:.0f} MiB, end {m['end_mib']:.0f} MiB, max "
                     f"{m['max_mib']:.0f} MiB, growth {m['growth_mib']:+.1f} MiB ({m['growth_pct']:+.2f}%), "
                     f"bound {m['bound_mib']:g} MiB")
        for title, p in m["processes"].items():
            lines.append(f"    {title:<48} {p['start_mib']:8.1f} -> {p['end_mib']:8.1f} MiB  "
                         f"({p['num_start']} -> {p['num_end']} processes)")
        if m["restarted"]:
            lines.append(f"    processes replaced during the run: {m['restarted']}")
    else:
        lines.append(f"  memory: {m.get('note')}")
    cache = report["cache_at_end"]
    if "error" in cache:
        lines.append(f"  cache at end: {cache['error']}")
    else:
        lines.append(f"  cache at end: {cache['num_free_blocks']}/{cache['num_blocks']} blocks free, "
                     f"{cache['num_running']} running, {cache['num_waiting']} waiting (idle after "
                     f"{report['drain_s']:.1f} s); live requests {report['health_at_end'].get('live_requests')}")
    lines.append("PASSED" if report["passed"] else "FAILED:\n" + "\n".join(f"  - {f}" for f in report["failures"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", action="store_true", help="start a server on this machine (the tiny model)")
    ap.add_argument("--url", help="the running server's HTTP address, e.g. http://127.0.0.1:8000")
    ap.add_argument("--grpc", help="the running server's gRPC address, e.g. 127.0.0.1:9000")
    ap.add_argument("--model-dir", help="the checkpoint the server serves (default: the built-in tiny model)")
    ap.add_argument("--model", help="the served model name (default: the only one GET /v1/models lists)")
    ap.add_argument("--api-key", default=os.environ.get("LATENTMOE_API_KEY"))
    ap.add_argument("--ray-address", help="the server's Ray cluster (GCS host:port), to count only its processes' "
                    "memory (default with --start: the one started; else every Ray process on this machine)")
    ap.add_argument("--max-body-bytes", type=int, default=None,
                    help="the server's max_body_bytes (default: 65536 with --start, else 1048576)")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load, after the warm-up")
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-bound-mib", type=float, default=None, help="allowed growth of the RSS (default 200)")
    ap.add_argument("--out", default="results/soak.json")
    args = ap.parse_args()
    if args.start == bool(args.url or args.grpc):
        ap.error("give either --start or both --url and --grpc")
    if not args.start and not (args.url and args.grpc):
        ap.error("--url and --grpc go together")

    from latentmoe import LLM
    from latentmoe.model.tiny import default_model_dir
    from latentmoe.loadtest import soak

    model_dir = args.model_dir or str(default_model_dir())
    max_body_bytes = args.max_body_bytes or (65536 if args.start else soak.DEFAULT_MAX_BODY_BYTES)
    expected = soak.expected_outputs(LLM(model=model_dir))

    def progress(p: dict) -> None:
        print(f"  {p['elapsed_s']:6.0f}/{p['duration_s']:.0f} s  {p['requests']} requests, {p['errors']} errors, "
              f"RSS {p['rss_mib']:.0f} MiB", flush=True)

    async def run(http_url: str, grpc_target: str, model: str | None) -> dict:
        if model is None:
            import httpx2 as httpx

            headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            async with httpx.AsyncClient(timeout=30, headers=headers) as client:
                response = await client.get(http_url.rstrip("/") + "/v1/models")
            response.raise_for_status()
            models = [m["id"] for m in response.json()["data"]]
            if len(models) != 1:
                raise SystemExit(f"the server serves {models}: say which with --model")
            model = models[0]
        return await soak.run_soak(
            http_url, grpc_target, model, expected, duration_s=args.duration, concurrency=args.concurrency,
            seed=args.seed, api_key=args.api_key, max_body_bytes=max_body_bytes, progress=progress,
            ray_address=args.ray_address,
            memory_bound_mib=soak.MEMORY_BOUND_MIB if args.memory_bound_mib is None else args.memory_bound_mib)

    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
              "model_dir": model_dir, "started_server": args.start}
    if args.start:
        t = time.perf_counter()
        print("starting a Ray cluster and the server on this machine ...", flush=True)
        with local_server(model_dir, max_body_bytes) as (http_url, grpc_target, model):
            result["server_start_s"] = round(time.perf_counter() - t, 1)
            print(f"server up in {result['server_start_s']:.0f} s: {http_url}, gRPC {grpc_target}", flush=True)
            report = asyncio.run(run(http_url, grpc_target, args.model or model))
    else:
        report = asyncio.run(run(args.url, args.grpc, args.model))
    result |= report
    result["loadavg_after"] = os.getloadavg()
    print(summary(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"saved {args.out}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
