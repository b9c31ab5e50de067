"""Where extracted archives and decoded images are cached: outside the clone, user-overridable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "CPQ_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root: ``$CPQ_CACHE_DIR`` if set, else the platform's user cache folder."""
    override = os.environ.get(CACHE_ENV)
    root = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("cpq"))
    root.mkdir(parents=True, exist_ok=True)
    return root
