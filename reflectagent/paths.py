"""Where reflectagent keeps files: one user cache root, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """``$REFLECTAGENT_HOME`` or the platform's user cache folder."""
    return Path(os.environ.get("REFLECTAGENT_HOME") or platformdirs.user_cache_dir("reflectagent"))


def models_dir() -> Path:
    return cache_root() / "models"


def judgments_dir() -> Path:
    return Path(os.environ.get("REFLECTAGENT_CACHE_DIR") or cache_root() / "judgments")


def server_dir() -> Path:
    """Server logs, vLLM caches and the state file of ``reflectagent serve``."""
    return Path(os.environ.get("REFLECTAGENT_SERVER_DIR") or cache_root() / "server")
