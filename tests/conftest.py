"""Shared fixtures: checkpoints are built locally (no Hub downloads here)."""

from __future__ import annotations

import os

import torch

# Triton kernels run under the interpreter on machines without a GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from latentmoe.model.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The built-in tiny model (seed 0), written once per test session."""
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
