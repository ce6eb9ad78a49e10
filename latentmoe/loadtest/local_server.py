"""``latentmoe serve`` on this machine, for tests and benchmarks: started, waited for, measured and stopped.

The server runs in a process group of its own with a marker in its environment (``MARK``). Every process
it starts inherits the marker, the Ray nodes too (which ``latentmoe serve`` starts in sessions of their
own), so ``marked_pids`` finds all of them: to sum their memory, and to check that nothing is left after
``stop()``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping, Sequence

import httpx2 as httpx

from latentmoe.cluster.communicator import free_port
from latentmoe.paths import cache_root

MARK = "LATENTMOE_TEST_MARK"  # the environment variable that marks a server's processes
PROMPT = "The experts of a mixture"
LATENTMOE = (str(Path(sys.executable).parent / "latentmoe"),)  # this virtualenv's CLI


def wait_ready(url: str, timeout: float = 300.0, *, interval: float = 1.0, request_timeout: float = 5.0,
               check: Callable[[], None] | None = None) -> float:
    """Poll ``GET url`` until it answers 200; returns the seconds it took.

    ``check``, if given, runs before every try and raises to give up early (the process behind ``url``
    exited). Raises ``TimeoutError`` when ``timeout`` seconds pass first.
    """
    start = time.monotonic()
    while True:
        if check is not None:
            check()
        try:
            if httpx.get(url, timeout=request_timeout).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(interval)


def marked_pids(env: Mapping[str, str]) -> list[int]:
    """Live processes (zombies aside) whose environment carries the marker of ``env`` (``env[MARK]``)."""
    mark = f"{MARK}={env[MARK]}".encode()
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


def rss_mib(pids: Sequence[int]) -> float:
    """The resident memory of ``pids`` together (``VmRSS``); processes that are gone count 0."""
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def wait_gone(env: Mapping[str, str], timeout: float = 60) -> list[int]:
    """Wait until no process carries the marker of ``env``; returns those still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := marked_pids(env)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_marked(env: Mapping[str, str]) -> None:
    """SIGKILL every process that carries the marker of ``env``."""
    for pid in marked_pids(env):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_process_group(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Stop a server started as its own process group as Ctrl-C does: SIGINT; SIGTERM if it still runs after
    ``timeout`` seconds, SIGKILL 10 s later."""
    for sig, wait_s in ((signal.SIGINT, timeout), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass


class LocalServer:
    """``latentmoe serve`` started with ``env`` (a marker is added when it has none), on free ports.

    ``serve_args`` go to ``latentmoe serve`` as they are, after the ports (and ``--model``, when given).
    ``command`` is the CLI to run (default: this virtualenv's ``latentmoe``); ``own_ray_port=False`` leaves
    the GCS port of the local cluster to the CLI's default (for a CLI without ``--ray-port``). Output goes to
    ``log_path``, default ``$HOME/serve.log`` of ``env``.
    """

    def __init__(self, env: Mapping[str, str], *serve_args: str, model: str | Path | None = None,
                 command: Sequence[str] = LATENTMOE, own_ray_port: bool = True, log_path: Path | None = None,
                 cwd: str | Path | None = None):
        self.env = {**env, MARK: env.get(MARK) or uuid.uuid4().hex}
        self.http, self.grpc = free_port(), free_port()
        self.ray_port = free_port() if own_ray_port else None
        self.url = f"http://127.0.0.1:{self.http}"
        args = [*command, "serve", *(["--model", str(model)] if model is not None else []),
                "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                *(["--ray-port", str(self.ray_port)] if own_ray_port else []), *serve_args]
        self.log = open(log_path or Path(self.env["HOME"]) / "serve.log", "w+")
        # cwd: another checkout's directory when ``command`` runs its code (``python -m`` puts cwd first on the path)
        self.proc = subprocess.Popen(args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"latentmoe serve exited {self.proc.returncode}:\n{self.output()}")

    def wait_ready(self, timeout: float = 300, request_timeout: float = 5.0) -> float:
        """Wait until ``/health`` answers 200; returns the seconds it took. Raises ``RuntimeError`` if the
        server exits first, ``TimeoutError`` (with its output) after ``timeout`` seconds."""
        try:
            return wait_ready(self.url + "/health", timeout, request_timeout=request_timeout,
                              check=self._check_running)
        except TimeoutError:
            raise TimeoutError(f"latentmoe serve not healthy after {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        """The last 6000 characters the server wrote."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    @property
    def model_name(self) -> str:
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def complete(self, prompt: str = PROMPT, max_tokens: int = 8, **fields) -> dict:
        """One ``/v1/completions`` request (``fields`` added to the body); raises ``RuntimeError`` unless 200."""
        r = httpx.post(self.url + "/v1/completions", timeout=60, json={
            "model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, **fields})
        if r.status_code != 200:
            raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text}")
        return r.json()

    def state(self) -> dict:
        """The record of the local cluster the server started (``latentmoe.actors.local_cluster``)."""
        assert self.ray_port is not None, "the server was started without a GCS port of its own"
        return json.loads((cache_root(self.env) / f"cluster-{self.ray_port}.json").read_text())

    def pids(self) -> list[int]:
        """The server's processes: every one that carries its marker."""
        return marked_pids(self.env)

    def stop(self, timeout: float = 120, grace: float = 60) -> list[int]:
        """Stop the server as Ctrl-C does: SIGINT to its process group; SIGTERM if the CLI still runs after
        ``timeout`` seconds, SIGKILL 10 s later. Every process with its marker then has ``grace`` seconds to
        end before it is killed; returns those that had to be (empty: a clean stop)."""
        stop_process_group(self.proc, timeout)
        left = wait_gone(self.env, grace)
        kill_marked(self.env)
        return left
