"""A multi-node Ray cluster on one machine: a head and worker nodes that advertise their role.

Each node is a separate ``ray start`` (its own raylet and object store), so shards placed on
different nodes are separate processes talking through the collective group, as on a real
cluster. The head advertises no role; it hosts the router and the serving front door.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Callable

from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE
from latentmoe.cluster.communicator import free_port

# Ray Serve's gRPC proxy accepts messages up to 2 GiB by default; the head node's processes (the proxy among
# them) get a 4 MiB limit instead, gRPC's own default. Larger messages get RESOURCE_EXHAUSTED from gRPC itself.
GRPC_MAX_MESSAGE_BYTES = 4 << 20
PROXY_ENV = {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE_BYTES)}


def _ray() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else (shutil.which("ray") or "ray")


def _run(args: list[str], echo: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    echo("$ " + " ".join(args))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def start_local_cluster(attention_nodes: int = 1, expert_nodes: int = 2, *, shards_per_node: int = 2,
                        cpus_per_node: int = 2, port: int = 6379, echo: Callable[[str], None] = print) -> str:
    """Start the head and the worker nodes; returns the cluster address (``127.0.0.1:port``)."""
    for name, value in (("attention_nodes", attention_nodes), ("expert_nodes", expert_nodes),
                        ("shards_per_node", shards_per_node), ("cpus_per_node", cpus_per_node)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    ray = _ray()
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    _run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", *common], echo,
         env={k: os.environ.get(k, v) for k, v in PROXY_ENV.items()})
    address = f"127.0.0.1:{port}"
    roles = [ATTENTION_RESOURCE] * attention_nodes + [EXPERT_RESOURCE] * expert_nodes
    try:
        for role in roles:
            # every raylet on the machine needs its own agent and metrics ports
            _run([ray, "start", f"--address={address}", f"--num-cpus={cpus_per_node}",
                  f"--resources={json.dumps({role: shards_per_node})}",
                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                  *common], echo)
    except BaseException:
        stop_local_cluster(echo)
        raise
    echo(f"started a Ray cluster at {address}: {attention_nodes} attention node(s), {expert_nodes} expert node(s), "
         f"{shards_per_node} shard(s) each; stop it with `latentmoe cluster stop`")
    return address


def stop_local_cluster(echo: Callable[[str], None] = print) -> None:
    _run([_ray(), "stop", "--force"], echo)
