"""The local cluster as a newcomer meets it: Ray's token file, `latentmoe serve`, `LLM(...)` with no cluster
running, and `latentmoe cluster stop` next to a Ray cluster it did not start.

Each scenario runs the real commands in processes of their own, with a HOME and a Ray temp directory of
their own (so neither the user's ~/.ray nor another Ray on the machine is seen), and a marker in their
environment: every process they leave behind carries it, which is how "nothing runs afterwards" is checked.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from latentmoe.actors.local_cluster import cluster_shape, direct_ingress_env, ray_auth_env
from latentmoe.cluster.communicator import free_port
from tests.actors.sandbox import BIN, PROMPT, Server, kill_marked, marked_pids, ray_made_token_file, sandbox, wait_gone


# ---------------------------------------------------------------------------------------------- plain units

def test_auth_env_makes_a_private_token_once(tmp_path):
    env = ray_auth_env(None, environ={}, home=tmp_path)
    token = tmp_path / ".ray" / "auth_token"
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    assert len(token.read_text()) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
    first = token.read_text()
    assert ray_auth_env("token", environ={}, home=tmp_path) == env and token.read_text() == first  # reused


def test_auth_env_respects_the_users_settings(tmp_path):
    own = tmp_path / "my-token"
    own.write_text("0123456789abcdef" * 4)
    assert ray_auth_env(None, environ={"RAY_AUTH_TOKEN_PATH": str(own)}, home=tmp_path) == {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(own)}
    assert own.read_text() == "0123456789abcdef" * 4
    assert ray_auth_env(None, environ={"RAY_AUTH_TOKEN": "x" * 32}, home=tmp_path) == {"RAY_AUTH_MODE": "token"}
    assert ray_auth_env(None, environ={"RAY_AUTH_MODE": "disabled"}, home=tmp_path) == {"RAY_AUTH_MODE": "disabled"}
    assert ray_auth_env("disabled", environ={}, home=tmp_path) == {"RAY_AUTH_MODE": "disabled"}
    assert not (tmp_path / ".ray").exists()  # nothing written when the user's token or no token is used
    with pytest.raises(ValueError, match="'tokens'"):
        ray_auth_env("tokens", environ={}, home=tmp_path)


def _ephemeral_ports() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_local_cluster_ports_are_its_own():
    """Each cluster's ingress replicas take ports of ranges of its own (HAProxy mode binds them with SO_REUSEPORT:
    a shared port is shared silently), and so do its services; all lie below the ephemeral range, where no
    outgoing connection takes them before they are bound; a slot something listens on is passed by; the user's
    settings win."""
    import socket

    from latentmoe.actors.local_cluster import port_slot, service_ports

    def ranges(env):
        return [(int(env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{k}_PORT"]), int(env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{k}_PORT"]))
                for k in ("HTTP", "GRPC")]

    def services(slot):
        ports = service_ports(slot)
        return [next(ports) for _ in range(10)]

    ephemeral = _ephemeral_ports()
    slot_a, slot_b = port_slot(6379), port_slot(6380)
    a, b = ranges(direct_ingress_env(slot_a, environ={})), ranges(direct_ingress_env(slot_b, environ={}))
    sa, sb = services(slot_a), services(slot_b)
    spans = [range(lo, hi + 1) for lo, hi in a + b] + [range(p, p + 1) for p in sa + sb]
    taken = [p for span in spans for p in span]
    assert len(taken) == len(set(taken)), (a, b, sa, sb)  # nothing shared
    assert not any(p in ephemeral or 10002 <= p <= 19999 for p in taken)  # nor with Ray's workers
    assert all(hi < lo for (_, hi), (lo, _) in [(a[0], a[1]), (b[0], b[1])])  # HTTP below gRPC
    with socket.create_server(("127.0.0.1", a[1][0] + 7)) as listening:  # something listens in the first choice
        moved = port_slot(6379)
        assert moved != slot_a
        lo, hi = ranges(direct_ingress_env(moved, environ={}))[1]
        assert not lo <= listening.getsockname()[1] <= hi
    with socket.create_server(("127.0.0.1", sa[0])):
        assert next(service_ports(slot_a)) == sa[1]  # a service port something listens on is passed by
    own = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "25000", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "25010"}
    assert direct_ingress_env(slot_a, environ=own) == own


def test_free_port_lies_below_the_ephemeral_range():
    """What ``free_port`` picks for a server to bind later is outside the range every outgoing connection draws
    from, not bound now, and not one of the process's recent picks; a long-lived process (a coordinator forming
    its group again and again) never runs out."""
    import socket

    from latentmoe.cluster.communicator import free_port

    picked = [free_port() for _ in range(50)]
    assert len(set(picked)) == 50
    ephemeral = _ephemeral_ports()
    assert not any(p in ephemeral or 10002 <= p <= 19999 for p in picked), picked
    for port in picked[:5]:
        with socket.create_server(("127.0.0.1", port)):  # each could be bound
            pass
    many = [free_port() for _ in range(6000)]  # more than the range holds
    assert all(len(set(many[i : i + 1000])) == 1000 for i in range(0, 6000, 1000))


@pytest.mark.parametrize("attention, expert, want", [
    (1, 2, dict(attention_nodes=1, expert_nodes=1, shards_per_node=2, cpus_per_node=3)),
    (2, 2, dict(attention_nodes=1, expert_nodes=1, shards_per_node=2, cpus_per_node=3)),
    (3, 5, dict(attention_nodes=1, expert_nodes=3, shards_per_node=3, cpus_per_node=4)),
])
def test_cluster_shape_holds_the_shards(attention, expert, want):
    shape = cluster_shape(attention, expert)
    assert shape == want
    assert shape["attention_nodes"] * shape["shards_per_node"] >= attention
    assert shape["expert_nodes"] * shape["shards_per_node"] >= expert


# ------------------------------------------------------------------------------------- processes for real

@pytest.fixture(scope="module")
def greedy_text(tiny_dir):
    from latentmoe import LLM, SamplingParams

    out = LLM(model=str(tiny_dir)).generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
    return out.text, out.token_ids


@pytest.mark.parametrize("token_file", ["left by ray.init()", "none"])
def test_serve_with_and_without_a_token_file(tmp_path, tiny_dir, greedy_text, token_file):
    env = sandbox(tmp_path)
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    if token_file != "none":
        ray_made_token_file(env)
        before = token.read_text()
    server = Server(env, tiny_dir)
    try:
        server.wait_ready()
        assert server.complete()["choices"][0]["text"] == greedy_text[0]
        state = server.state()
        # token authentication on every node, with the user's token if there was one, else a new one
        assert state["env"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        if token_file != "none":
            assert token.read_text() == before
        assert len(state["nodes"]) == 3
        # Ray's dashboard on the head, and it checks the token
        dashboard = state["dashboard_url"]
        assert httpx.get(dashboard + "/api/version", timeout=10).status_code == 401
        ok = httpx.get(dashboard + "/api/version", timeout=10,
                       headers={"Authorization": f"Bearer {token.read_text().strip()}"})
        assert ok.status_code == 200, ok.text
        # HAProxy's configuration and sockets in a directory of the cluster's own, not /tmp/haproxy-serve
        files = Path(state["files_dir"])
        assert list(files.glob("*/haproxy.cfg")) and list(files.glob("*/admin.sock")), sorted(files.rglob("*"))
    finally:
        server.stop()
    assert not files.exists()  # removed with the cluster


def test_two_servers_side_by_side(tmp_path, tiny_dir, greedy_text):
    """A second `latentmoe serve` on a machine where one runs, each with its cluster, each serving its own model
    name: every HTTP and gRPC request reaches its own server, on new connections each time. With HAProxy in front
    (the default) and Serve's machine-wide ports this failed three ways: the second HAProxy could not bind the
    statistics and metrics ports and exited; its HTTP requests went to the first cluster's fallback proxy (8500);
    its gRPC ones to the first cluster's ingress replica (both bound 40000, with SO_REUSEPORT). One after the
    other: two clusters starting at the same instant can still both pick Ray's dashboard port."""
    import grpc

    from latentmoe.proto import generate_pb2 as pb
    from latentmoe.proto import generate_pb2_grpc

    other = tmp_path / "tiny-other"  # the same weights under another served name
    shutil.copytree(tiny_dir, other)
    servers = []
    try:
        for name, model in (("a", tiny_dir), ("b", other)):
            servers.append(Server(sandbox(tmp_path / name), model))
            servers[-1].wait_ready()
        for server, model in zip(servers, (tiny_dir, other)):
            assert server.model_name == model.name
            for _ in range(8):  # a new connection each time: the kernel would spread them over both clusters
                answer = httpx.post(server.url + "/v1/completions", timeout=60, json={
                    "model": model.name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"] == greedy_text[0]
                with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
                    reply = generate_pb2_grpc.GeneratorStub(channel).Generate(pb.GenerateRequest(
                        text=PROMPT, model=model.name, params=pb.SamplingParams(max_tokens=8, temperature=0)),
                        timeout=60)
                assert list(reply.token_ids) == list(greedy_text[1])
    finally:
        for server in servers:
            server.stop()


LLM_SCRIPT = """
import json, sys
from latentmoe import LLM, SamplingParams
llm = LLM(model=sys.argv[1], attention_shards=2, expert_shards=2)
out = llm.generate([{prompt!r}], SamplingParams(max_tokens=8, temperature=0.0))[0]
print(json.dumps({{"token_ids": out.token_ids, "shards": {{r: len(v) for r, v in llm.shards().items()}}}}))
if sys.argv[2] == "shutdown":
    llm.shutdown()
"""


@pytest.mark.parametrize("ending", ["shutdown", "interpreter exit, with RAY_AUTH_MODE=disabled"])
def test_llm_starts_and_stops_its_own_cluster(tmp_path, tiny_dir, greedy_text, ending):
    """``LLM(attention_shards=2, expert_shards=2)`` on this 2-core machine with no cluster running."""
    disabled = "disabled" in ending
    env = sandbox(tmp_path, **({"RAY_AUTH_MODE": "disabled"} if disabled else {}))
    if disabled:
        ray_made_token_file(env)  # the file that used to split head and workers
    proc = subprocess.run([sys.executable, "-c", LLM_SCRIPT.format(prompt=PROMPT), str(tiny_dir),
                           "shutdown" if ending == "shutdown" else "exit"],
                          env=env, capture_output=True, text=True, timeout=400)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        # Ray copies its workers' log lines into the driver's stdout: the script's answer is its JSON line
        answers = [line for line in proc.stdout.splitlines() if line.startswith('{"token_ids"')]
        assert len(answers) == 1, proc.stdout[-3000:]
        result = json.loads(answers[0])
        assert result["token_ids"] == greedy_text[1]
        assert result["shards"] == {"attention": 2, "expert": 2}
        left = wait_gone(env, timeout=30)
        assert not left, f"processes left after the LLM ended ({ending}): {left}"
    finally:
        kill_marked(env)


def test_cluster_stop_stops_only_its_own(tmp_path):
    env = sandbox(tmp_path)
    ray, latentmoe = str(BIN / "ray"), str(BIN / "latentmoe")
    # somebody else's Ray on the same machine, with a marker of its own
    other_env = {**sandbox(tmp_path / "other"), "RAY_AUTH_MODE": "disabled"}
    other_port = free_port()
    subprocess.run([ray, "start", "--head", f"--port={other_port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats"], env=other_env, check=True, timeout=180, capture_output=True,
                   start_new_session=True)
    port = free_port()
    try:
        start = subprocess.run([latentmoe, "cluster", "start", "--port", str(port), "--attention-nodes", "1",
                                "--expert-nodes", "1", "--no-dashboard"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stderr[-4000:]
        assert start.stdout.strip() == f"127.0.0.1:{port}"
        # Ray's own CLI joins it through `latentmoe cluster env`
        exports = subprocess.run([latentmoe, "cluster", "env", "--port", str(port)], env=env, capture_output=True,
                                 text=True, timeout=60, check=True).stdout
        # `ray status` prints the autoscaler's last report, made every few seconds: a node that registered just
        # before may be missing from it (CI once saw 2 of 3 right after `cluster start`)
        deadline = time.monotonic() + 60
        while True:
            status = subprocess.run(["bash", "-c", f'eval "{exports}"; {ray} status'], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert status.returncode == 0, status.stderr[-3000:]
            if status.stdout.count(" node_") == 3 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status.stdout.count(" node_") == 3, status.stdout
        # without the token, Ray refuses (authentication is on)
        refused = subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], env={**env, "RAY_AUTH_MODE": "disabled"},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr

        others = marked_pids(other_env)
        assert others
        stop = subprocess.run([latentmoe, "cluster", "stop", "--port", str(port)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert not wait_gone(env, timeout=30)
        assert set(marked_pids(other_env)) == set(others), "cluster stop ended processes it did not start"
        alive = subprocess.run([ray, "status", f"--address=127.0.0.1:{other_port}"], env=other_env,
                               capture_output=True, text=True, timeout=120)
        assert alive.returncode == 0, alive.stderr[-2000:]
        again = subprocess.run([latentmoe, "cluster", "stop", "--port", str(port)], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 1 and "no cluster started by `latentmoe cluster start`" in again.stderr
    finally:
        kill_marked(env)
        kill_marked(other_env)
