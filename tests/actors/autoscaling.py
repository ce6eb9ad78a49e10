"""A real Ray cluster on this machine whose autoscaler is Ray's own, on Ray's fake multi-node provider.

The head is a ``ray start --head --autoscaling-config=...`` like ``start_local_cluster``'s (token
authentication, its own process group); Ray's monitor on the head then launches and removes worker nodes
of the configured types as demand asks, each a raylet of its own on this machine. Those raylets are the
monitor's children, in the head's process group; Ray's workers lead groups of their own. Every process of
the cluster carries a marker in its environment, so ``stop()`` ends exactly those and nothing else.

Ray's ``ray.cluster_utils.AutoscalingCluster`` would do this, but it reads ``fake_multi_node/example.yaml``,
which the pip wheel lacks, and it runs ``ray stop --force``: the whole config is written here instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

from latentmoe.actors.local_cluster import (
    LocalCluster, _port_in_use, _ray, _start_node, port_slot, ray_auth_env, service_ports,
)
from latentmoe.cluster.communicator import free_port

HEAD_NODE_TYPE = "ray.head.default"  # the name Ray's fake provider gives the head
MARKER = "LATENTMOE_AUTOSCALING_CLUSTER"  # in the environment of every process of a cluster: its temp dir


@dataclass
class AutoscalingCluster:
    """A cluster started by ``start_autoscaling_cluster``: its address, the authentication environment of its
    nodes (clients use the same), the head's process group and the cluster's own Ray temp directory."""

    address: str
    env: dict[str, str]
    pgid: int
    temp_dir: str  # Ray's --temp-dir: sessions, logs, the config; its own, so /tmp/ray is left alone

    def pids(self) -> list[int]:
        """The live processes of the cluster: head, monitor, every node the autoscaler started and their workers.

        Found by the marker in their environment (Ray's workers rename themselves ``ray::...``, so their
        command lines do not tell), whatever their process group.
        """
        return marked_pids(self.temp_dir)

    def alive_nodes(self, resource: str | None = None) -> list[dict]:
        """The nodes alive now (``ray.nodes()`` entries) that advertise ``resource``, or all of them.

        Needs this process connected to the cluster (``ray.init(address=cluster.address)``).
        """
        assert ray.is_initialized(), "alive_nodes() asks the GCS through ray.nodes(): ray.init() first"
        return [n for n in ray.nodes() if n["Alive"] and (resource is None or n["Resources"].get(resource, 0) > 0)]

    def stop(self, timeout_s: float = 5.0) -> None:
        """End every process of the cluster (SIGTERM, then SIGKILL after ``timeout_s``) and remove its temp dir."""
        LocalCluster(address=self.address, env=self.env, nodes=[{"role": "head", "pgid": self.pgid}]).stop(
            echo=lambda _: None, timeout_s=timeout_s)
        # Ray's workers lead process groups of their own (the raylet's process_group_cleanup): they end when
        # their raylet has gone, but not at once; end those left the same way
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        assert not self.pids(), f"processes of the cluster at {self.address} outlived stop(): {self.pids()}"
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def marked_pids(temp_dir: str) -> list[int]:
    """Live processes (this one aside) whose environment carries the marker of the cluster at ``temp_dir``."""
    mark = f"\0{MARKER}={temp_dir}\0".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in b"\0" + Path(entry.path, "environ").read_bytes():
                stat = Path(entry.path, "stat").read_text()
                if stat[stat.rindex(")") + 2:].split()[0] != "Z":
                    pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def autoscaling_config(node_types: dict[str, dict], *, head_resources: dict, head_num_cpus: int,
                       idle_timeout_minutes: float, gcs_address: str) -> dict:
    """The whole cluster config Ray's monitor reads (the keys of Ray's fake_multi_node/example.yaml).

    ``node_types`` maps a type name to ``{"resources": {..., "CPU": n}, "min_workers": k, "max_workers": m}``
    and optionally ``"labels": {...}``, the Ray node labels of its nodes (the fake provider starts them with these).
    """
    if HEAD_NODE_TYPE in node_types:
        raise ValueError(f"{HEAD_NODE_TYPE!r} is the head's node type; name the worker types otherwise")
    types = {}
    for name, spec in node_types.items():
        unknown = set(spec) - {"resources", "labels", "min_workers", "max_workers"}
        if unknown:
            raise ValueError(f"node type {name!r}: unknown keys {sorted(unknown)}")
        if "CPU" not in spec.get("resources", {}):
            raise ValueError(f"node type {name!r}: resources must name CPU (the raylet's --num-cpus)")
        types[name] = {"resources": dict(spec["resources"]), "labels": dict(spec.get("labels", {})),
                       "node_config": {}, "min_workers": spec.get("min_workers", 0),
                       "max_workers": spec.get("max_workers", 1)}
    types[HEAD_NODE_TYPE] = {"resources": {"CPU": head_num_cpus, **head_resources}, "node_config": {},
                             "max_workers": 0}
    return {
        "cluster_name": "latentmoe-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,  # every fake node has the machine's IP: the autoscaler tells them by id
            "disable_node_updaters": True,  # no SSH, no setup commands: the provider starts raylets itself
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the provider's default is <this machine's IP>:6379
        },
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def start_autoscaling_cluster(node_types: dict[str, dict], *, head_resources: dict, head_num_cpus: int,
                              idle_timeout_minutes: float, port: int | None = None,
                              env: dict | None = None) -> AutoscalingCluster:
    """Start the head with Ray's autoscaler on the fake provider; worker nodes come and go on demand.

    ``node_types``: as ``autoscaling_config``'s. ``head_resources``: the head's custom resources (no CPU;
    ``head_num_cpus`` is its CPU count). ``idle_timeout_minutes`` may be a fraction (0.1 is 6 s): a worker
    idle that long is removed, down to its type's ``min_workers``. ``port``: the GCS port, a free one by
    default. ``env``: added to the environment of the head (and so of every node the autoscaler starts).
    Returns once the head is up; ``min_workers`` nodes follow a few seconds later.
    """
    if "CPU" in head_resources:
        raise ValueError("head_resources must not name CPU: pass head_num_cpus")
    port = port or free_port()
    if _port_in_use(port):
        raise RuntimeError(f"port {port} is in use on this machine")
    temp_dir = tempfile.mkdtemp(prefix="lmas", dir="/tmp")  # short: Ray's unix sockets live under it
    address = f"127.0.0.1:{port}"
    config_path = os.path.join(temp_dir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(autoscaling_config(node_types, head_resources=head_resources, head_num_cpus=head_num_cpus,
                                     idle_timeout_minutes=idle_timeout_minutes, gcs_address=address), f, indent=2)
    auth = ray_auth_env()
    node_env = {**auth, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {}),
                MARKER: temp_dir}
    # the head's listeners and metric exporters default to fixed ports (8265, 10001, 52365, 44227, ...), which
    # another Ray on the machine may hold: the cluster's own, below the ephemeral range, as local clusters take them
    ports = service_ports(port_slot(port))
    for key in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"):
        if key not in node_env:
            node_env[key] = os.environ.get(key) or str(next(ports))
    args = [_ray(), "start", "--head", f"--port={port}", f"--num-cpus={head_num_cpus}",
            f"--autoscaling-config={config_path}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
            "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--dashboard-port={next(ports)}", f"--ray-client-server-port={next(ports)}",
            f"--dashboard-agent-listen-port={next(ports)}", f"--metrics-export-port={next(ports)}"]
    if head_resources:
        args.append(f"--resources={json.dumps(head_resources)}")
    try:
        pgid = _start_node(args, node_env, echo=lambda _: None)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return AutoscalingCluster(address=address, env=auth, pgid=pgid, temp_dir=temp_dir)


@contextlib.contextmanager
def serving_cluster(node_types: dict[str, dict], *, idle_timeout_minutes: float, head_num_cpus: int = 2,
                    timeout_s: float = 120.0) -> Iterator[tuple[AutoscalingCluster, str]]:
    """An autoscaling cluster of ``node_types`` (a head of its own, no role units), this process connected, its
    ``min_workers`` nodes up and Serve started on it (HTTP on a free loopback port, proxy on the head only).
    Yields the cluster and Serve's HTTP address; afterwards Serve, the coordinator and the cluster stop."""
    from ray import serve

    from latentmoe.actors.cluster import stop_coordinator
    from latentmoe.actors.local_cluster import use_ray_auth

    c = start_autoscaling_cluster(node_types, head_resources={}, head_num_cpus=head_num_cpus,
                                  idle_timeout_minutes=idle_timeout_minutes)
    try:
        use_ray_auth(c.env)
        ray.init(address=c.address, log_to_driver=False)
        wanted = 1 + sum(t.get("min_workers", 0) for t in node_types.values())
        deadline = time.monotonic() + timeout_s
        while len(c.alive_nodes()) < wanted:
            assert time.monotonic() < deadline, f"the min_workers nodes: not {wanted} within {timeout_s:g} s"
            time.sleep(0.5)
        http_port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        yield c, f"http://127.0.0.1:{http_port}"
    finally:
        try:
            serve.shutdown()
            stop_coordinator()
        except Exception:  # noqa: BLE001: the cluster goes anyway
            pass
        ray.shutdown()
        c.stop()
