"""Scale-out time (#17): from load over the target to a new attention shard serving, and its parts.

    python benchmarks/bench_scale_out.py [--settings 30:10,10:2] [--repeats 2] [--clients 8] [--max-tokens 64]
                                         [--out results/bench_scale_out.json]

On a Ray cluster of this machine whose autoscaler is Ray's own (its fake multi-node provider, as
``tests/actors/test_autoscaling.py`` uses: attention nodes min 1 max 2, one attention shard per node, two
expert nodes), the Serve application on the built-in tiny model with ``attention_shards 1:2``,
``target_shard_requests 2`` and ``upscale_delay_s 1``. ``--clients`` clients each send streaming requests
back to back, and the state is polled every 0.1 s from the first request on:

- ``serve_decided_s``: Serve's controller has started a second replica (``serve.status``: one not RUNNING);
- ``node_up_s``: Ray's autoscaler has the second attention node up (the replica asked for its resource);
- ``replica_running_s``: the second replica is RUNNING (its attention shard loaded the model);
- ``joined_s``: the coordinator's group has two attention shards (the new one joined at a step boundary);
- ``serving_s``: the new shard has run tokens (the shard router sent it requests).

Then the clients stop and the scale-in is timed the same way (``replica_gone_s``, ``node_gone_s``, from the
last request's end). Each of ``--settings`` (Serve's autoscaling look-back window and metrics interval, seconds:
``autoscaling_look_back_s:autoscaling_metrics_interval_s``; 30:10 is Serve's default) runs ``--repeats`` times,
on the same cluster, one after the other; prints each run and saves everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MINUTES = 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="30:10,10:2", help="comma-separated LOOK_BACK_S:METRICS_INTERVAL_S")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default="results/bench_scale_out.json")
    args = ap.parse_args()

    import httpx2 as httpx
    import ray
    from ray import serve

    from latentmoe.actors.cluster import ROUTER_NAMESPACE
    from latentmoe.actors.names import ATTENTION_DEPLOYMENT, COORDINATOR_NAME
    from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_labels
    from latentmoe.actors.serve_app import build_app
    from latentmoe.model.tiny import default_model_dir
    from tests.actors.autoscaling import serving_cluster  # the one fake-provider cluster helper

    node_types = {
        "attention": {"resources": {"CPU": 2, ATTENTION_RESOURCE: 1}, "labels": role_labels(ATTENTION_RESOURCE),
                      "min_workers": 1, "max_workers": 2},
        "expert": {"resources": {"CPU": 2, EXPERT_RESOURCE: 1}, "labels": role_labels(EXPERT_RESOURCE),
                   "min_workers": 2, "max_workers": 2},
    }
    app_args = {"model": str(default_model_dir()), "served_model_name": "tiny", "attention_shards": "1:2",
                "expert_shards": 2, "place_by_role": True, "target_shard_requests": 2, "upscale_delay_s": 1.0,
                "downscale_delay_s": 8.0, "drain_timeout_s": 60.0, "engine": {"block_size": 16, "num_blocks": 256},
                "max_num_requests": 32, "min_replicas": 1, "max_replicas": 1, "api_key": None, "api_key_env": None}
    result = {"args": vars(args), "app": app_args, "node_types": node_types, "machine": platform.machine(),
              "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "runs": []}

    def wait(condition, what: str) -> float:
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > args.timeout_s:
                raise TimeoutError(f"{what}: not within {args.timeout_s:g} s")
            time.sleep(0.1)
        return time.monotonic()

    with serving_cluster(node_types, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES) as (c, url):
        def replica_states() -> dict:
            app = serve.status().applications.get("latentmoe")
            deployment = app.deployments.get(ATTENTION_DEPLOYMENT) if app else None
            return dict(deployment.replica_states) if deployment else {}

        def attention_shards() -> list[dict]:
            return [info for _, info in ray.get(coordinator.shards.remote(), timeout=30)["attention"]]

        for setting, repeat in [(s, r) for s in args.settings.split(",") for r in range(args.repeats)]:
            look_back, interval = (float(x) for x in setting.split(":"))
            if repeat == 0:
                serve.run(build_app(app_args | {"autoscaling_look_back_s": look_back,
                                                "autoscaling_metrics_interval_s": interval}),
                          name="latentmoe", route_prefix="/")
                coordinator = ray.get_actor(COORDINATOR_NAME, namespace=ROUTER_NAMESPACE)
            wait(lambda: len(c.alive_nodes(ATTENTION_RESOURCE)) == 1 and replica_states() == {"RUNNING": 1},
                 "one attention shard, one attention node")
            first_node = attention_shards()[0]["node_id"]
            stop = threading.Event()
            served = []

            def client(i: int) -> None:
                body = {"model": "tiny", "prompt": [7 + i, 8, 9, 10 + repeat], "max_tokens": args.max_tokens,
                        "temperature": 0, "ignore_eos": True}
                while not stop.is_set():
                    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                    served.append(r.status_code)

            start = time.monotonic()
            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
            for t in threads:
                t.start()
            try:
                marks = {"serve_decided_s": wait(lambda: sum(replica_states().values()) >= 2, "a second replica"),
                         "node_up_s": wait(lambda: len(c.alive_nodes(ATTENTION_RESOURCE)) == 2, "a second node"),
                         "replica_running_s": wait(lambda: replica_states().get("RUNNING", 0) == 2, "RUNNING"),
                         "joined_s": wait(lambda: len(attention_shards()) == 2, "the group of two"),
                         "serving_s": wait(lambda: any(s["node_id"] != first_node and
                                                       s.get("cache", {}).get("num_tokens_run", 0) > 0
                                                       for s in attention_shards()), "the new shard serving")}
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=180)
            ended = time.monotonic()
            run = {"look_back_s": look_back, "metrics_interval_s": interval}
            run |= {name: round(t - start, 2) for name, t in marks.items()}
            replica_gone = wait(lambda: replica_states() == {"RUNNING": 1}, "the scale-in")
            node_gone = wait(lambda: len(c.alive_nodes(ATTENTION_RESOURCE)) == 1, "the node's removal")
            run |= {"replica_gone_s": round(replica_gone - ended, 2), "node_gone_s": round(node_gone - ended, 2),
                    "requests": len(served), "statuses": sorted(set(served))}
            result["runs"].append(run)
            print(f"look-back {look_back:g} s, metrics every {interval:g} s, scale-out {repeat + 1}: Serve decided "
                  f"{run['serve_decided_s']} s, node up {run['node_up_s']} s, replica running "
                  f"{run['replica_running_s']} s, joined the group {run['joined_s']} s, serving "
                  f"{run['serving_s']} s after the load began; scale-in: replica gone {run['replica_gone_s']} s, "
                  f"node gone {run['node_gone_s']} s after it ended ({run['requests']} requests, statuses "
                  f"{run['statuses']})")
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # tests.actors.autoscaling
    main()
