"""Commands run for real in a sandbox: a HOME, a Ray temp directory and a marker of their own.

Every process a sandboxed command leaves behind carries the marker in its environment, which is how tests
check that nothing runs afterwards (and measure what it all takes in memory). The server and the marker
scan are ``latentmoe.loadtest.local_server``'s, which the benchmarks use too; this adds the tests' checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from latentmoe.loadtest.local_server import (MARK, PROMPT, LocalServer, kill_marked, marked_pids, rss_mib,
                                             wait_gone)

__all__ = ["BIN", "PROMPT", "Server", "kill_marked", "marked_pids", "ray_made_token_file", "rss_mib", "sandbox",
           "serving", "wait_gone"]

BIN = Path(sys.executable).parent


def sandbox(tmp_path: Path, **extra) -> dict[str, str]:
    """An environment with its own HOME, Ray temp dir and marker; no Ray settings of the suite's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ray_tmp = tempfile.mkdtemp(prefix="lm", dir="/tmp")  # short: Ray's unix sockets live under it
    env.update({MARK: uuid.uuid4().hex}, HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp,
               LATENTMOE_CACHE=str(tmp_path / "home" / ".cache" / "latentmoe"), **extra)
    (tmp_path / "home").mkdir(parents=True, exist_ok=True)
    return env


def ray_made_token_file(env: dict[str, str]) -> Path:
    """What a newcomer's first local ``ray.init()`` leaves: Ray 2.60 writes ~/.ray/auth_token."""
    code = "import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); ray.shutdown()"
    plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token mode, made on first use
    subprocess.run([sys.executable, "-c", code], env=plain, check=True, timeout=180, capture_output=True)
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    assert token.exists(), "Ray 2.60 no longer writes ~/.ray/auth_token on a local ray.init()"
    return token


class Server(LocalServer):
    """``latentmoe serve`` in a sandbox, on free ports; its stop checks that it leaves nothing running."""

    def __init__(self, env: dict[str, str], model: Path, *extra_args: str):
        super().__init__(env, *extra_args, model=model)

    def complete(self) -> dict:
        return super().complete(PROMPT, max_tokens=8, temperature=0)

    def stop(self) -> None:
        """Ctrl-C, as the user stops it; then everything it started must be gone."""
        left = super().stop()
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
