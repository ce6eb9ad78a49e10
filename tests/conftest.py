"""Shared fixtures: checkpoints are built locally (no Hub downloads here)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

# Triton kernels run under the interpreter on machines without a GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from latentmoe.actors.local_cluster import ray_auth_env, use_ray_auth  # noqa: E402

# Every Ray cluster of the suite runs as latentmoe's local clusters do: with token authentication, on a token
# of the suite's own (never the user's ~/.ray/auth_token), set before any test starts a node or a client.
_AUTH_DIR = tempfile.mkdtemp(prefix="latentmoe-test-ray-auth-")
atexit.register(shutil.rmtree, _AUTH_DIR, True)  # the token goes with the run
use_ray_auth(ray_auth_env("token", environ={"RAY_AUTH_TOKEN_PATH": os.path.join(_AUTH_DIR, "auth_token")}))

from latentmoe.model.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The built-in tiny model (seed 0), written once per test session."""
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
