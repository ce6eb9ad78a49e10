"""Where latentmoe keeps what it writes on this machine: the built-in tiny models, the records of local clusters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """``$LATENTMOE_CACHE`` in ``environ``, default ``~/.cache/latentmoe``."""
    return Path(environ.get("LATENTMOE_CACHE", Path.home() / ".cache" / "latentmoe"))
