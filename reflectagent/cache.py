"""A persistent cache of judge steps, shared by experiments and processes.

DSPy's own LM cache is keyed by the raw request and lives in DSPy's folder; this one stores
parsed steps (with their original cost) under a key made of everything that changes them:
the backend's identity (model, endpoint or model folder, LoRA adapter; never the API key),
the sampling settings, the sample index and the exact messages rendered from the program's
signature, instructions, demos and inputs. A compiled program renders different messages,
so it never reads another program's steps. diskcache is SQLite underneath, so several
processes can share one folder, and a :class:`Lease` in it lets only one of them make a step
that all of them need.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import threading
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import diskcache

from reflectagent.paths import judgments_dir
from reflectagent.results import StepOutput, Usage

_current: contextvars.ContextVar[JudgmentCache | None] = contextvars.ContextVar("reflectagent_cache", default=None)
_default: JudgmentCache | None = None
SCHEMA_VERSION = 1
LEASE_TTL_ENV = "REFLECTAGENT_LEASE_TTL_S"
LEASE_TTL_S = 30.0  # renewed every third of it while held: a holder that dies frees the step within this


class Lease:
    """A claim, stored in the cache folder, on making one step: ``diskcache.add`` succeeds for one
    process only. The holder renews it from a background thread while it works, so a long step keeps
    it and a crashed holder loses it within ``ttl_s``; release removes it only if it is still ours."""

    def __init__(self, store: diskcache.Cache, key: str, ttl_s: float):
        self.store, self.name, self.ttl_s = store, f"lease:{key}", ttl_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.store.add(self.name, self.token, expire=self.ttl_s):
            return False
        self._renewer = threading.Thread(target=self._renew, name="reflectagent-lease", daemon=True)
        self._renewer.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if self.store.get(self.name) != self.token:
                return  # expired and taken by another process: nothing of ours to renew
            self.store.touch(self.name, expire=self.ttl_s)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self.store.transact():
            if self.store.get(self.name) == self.token:
                self.store.delete(self.name)


def step_key(**parts: Any) -> str:
    payload = json.dumps({"v": SCHEMA_VERSION, **parts}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Steps on disk, keyed by :func:`step_key`. ``enabled=False`` makes every lookup miss."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory else judgments_dir()
        self.enabled = enabled
        self._store: diskcache.Cache | None = None

    @property
    def store(self) -> diskcache.Cache:
        if self._store is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._store = diskcache.Cache(str(self.directory), size_limit=2**34, eviction_policy="none")
        return self._store

    def get(self, key: str) -> StepOutput | None:
        if not self.enabled:
            return None
        row = self.store.get(key)
        if row is None:
            return None
        row = dict(row, usage=Usage(**row["usage"]), truncated=tuple(row.get("truncated", ())), cached=True)
        return StepOutput(**row)

    def put(self, key: str, step: StepOutput) -> None:
        if self.enabled:
            self.store.set(key, {**asdict(step), "cached": False})

    def lease(self, key: str) -> Lease:
        """A claim on making the step ``key`` (see :class:`Lease`); ``$REFLECTAGENT_LEASE_TTL_S`` sets its life."""
        return Lease(self.store, key, float(os.environ.get(LEASE_TTL_ENV) or LEASE_TTL_S))

    def __len__(self) -> int:
        return len(self.store) if self.directory.exists() else 0

    def info(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "enabled": self.enabled,
            "entries": len(self),
            "bytes": self.store.volume() if self.directory.exists() else 0,
        }

    def clear(self) -> int:
        return self.store.clear() if self.directory.exists() else 0

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def current_cache() -> JudgmentCache:
    """The cache in force: set by :func:`use_cache`, else the default folder (or off by env)."""
    global _default
    cache = _current.get()
    if cache is not None:
        return cache
    if _default is None:
        off = os.environ.get("REFLECTAGENT_CACHE", "").lower() in {"0", "off", "false", "no"}
        _default = JudgmentCache(enabled=not off)
    return _default


@contextlib.contextmanager
def use_cache(cache: JudgmentCache):
    token = _current.set(cache)
    try:
        yield cache
    finally:
        _current.reset(token)
