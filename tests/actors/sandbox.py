"""Commands run for real in a sandbox: a HOME, a Ray temp directory and a marker of their own.

Every process a sandboxed command leaves behind carries the marker in its environment, which is how tests
check that nothing runs afterwards (and measure what it all takes in memory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx

from latentmoe.cluster.communicator import free_port

BIN = Path(sys.executable).parent
PROMPT = "The experts of a mixture"


def sandbox(tmp_path: Path, **extra) -> dict[str, str]:
    """An environment with its own HOME, Ray temp dir and marker; no Ray settings of the suite's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ray_tmp = tempfile.mkdtemp(prefix="lm", dir="/tmp")  # short: Ray's unix sockets live under it
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, LATENTMOE_TEST_MARK=uuid.uuid4().hex,
               LATENTMOE_CACHE=str(tmp_path / "home" / ".cache" / "latentmoe"), **extra)
    (tmp_path / "home").mkdir(parents=True, exist_ok=True)
    return env


def marked_pids(env: dict[str, str]) -> list[int]:
    """Live processes whose environment carries this sandbox's marker."""
    mark = f"LATENTMOE_TEST_MARK={env['LATENTMOE_TEST_MARK']}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in Path(entry.path, "environ").read_bytes():
                    state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def wait_gone(env: dict[str, str], timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    while (left := marked_pids(env)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def kill_marked(env: dict[str, str]) -> None:
    for pid in marked_pids(env):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ray_made_token_file(env: dict[str, str]) -> Path:
    """What a newcomer's first local ``ray.init()`` leaves: Ray 2.60 writes ~/.ray/auth_token."""
    code = "import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); ray.shutdown()"
    plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token mode, made on first use
    subprocess.run([sys.executable, "-c", code], env=plain, check=True, timeout=180, capture_output=True)
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    assert token.exists(), "Ray 2.60 no longer writes ~/.ray/auth_token on a local ray.init()"
    return token


class Server:
    """``latentmoe serve`` in a sandbox, on free ports."""

    def __init__(self, env: dict[str, str], model: Path, *extra_args: str):
        self.env = env
        self.http, self.grpc, self.ray_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.log = open(Path(env["HOME"]) / "serve.log", "w+")
        self.proc = subprocess.Popen(
            [str(BIN / "latentmoe"), "serve", "--model", str(model), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--ray-port", str(self.ray_port), *extra_args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> float:
        start = time.time()
        while time.time() - start < timeout:
            assert self.proc.poll() is None, f"latentmoe serve exited {self.proc.returncode}:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.time() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"latentmoe serve not healthy after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    @property
    def model_name(self) -> str:
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def complete(self) -> dict:
        r = httpx.post(self.url + "/v1/completions", timeout=60, json={
            "model": self.model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    def state(self) -> dict:
        return json.loads((Path(self.env["LATENTMOE_CACHE"]) / f"cluster-{self.ray_port}.json").read_text())

    def stop(self) -> None:
        """Ctrl-C, as the user stops it; then everything it started must be gone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        left = wait_gone(self.env)
        kill_marked(self.env)
        assert not left, f"processes left after latentmoe serve stopped: {left}\n{self.output()}"


@contextmanager
def serving(env: dict[str, str], model: Path, *extra_args: str):
    """A healthy ``latentmoe serve`` for the block; stopped (and checked to leave nothing) after it."""
    server = Server(env, model, *extra_args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
