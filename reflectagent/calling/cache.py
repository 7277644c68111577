"""A persistent cache of judge steps, shared by experiments and processes.

DSPy's own LM cache is keyed by the raw request and lives in DSPy's folder; this one stores
parsed steps (with their original cost) under a key made of everything that changes them:
the backend's identity (model, endpoint or model folder, LoRA adapter; never the API key),
the sampling settings, the sample index and the exact messages rendered from the program's
signature, instructions, demos and inputs. A compiled program renders different messages,
so it never reads another program's steps. diskcache is SQLite underneath, so several
processes can share one folder; Redis (``url="redis://..."``) shares one cache between machines.
A :class:`Lease` in either lets only one process make a step that all of them need.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diskcache

from reflectagent.errors import ReflectAgentError
from reflectagent.paths import judgments_dir
from reflectagent.records.results import StepOutput, Usage

if TYPE_CHECKING:
    from reflectagent.calling.config import Settings

logger = logging.getLogger(__name__)
_current: contextvars.ContextVar[JudgmentCache | None] = contextvars.ContextVar("reflectagent_cache", default=None)
_defaults: dict[tuple, JudgmentCache] = {}  # the caches settings configure, one per place (see current_cache)
_defaults_lock = threading.Lock()  # two threads asking at once open one cache, not two
_file_settings: Settings | None = None  # the config file's settings, read once, where no backend() block gives any
SCHEMA_VERSION = 1
LEASE_TTL_ENV = "REFLECTAGENT_LEASE_TTL_S"
CACHE_URL_ENV = "REFLECTAGENT_CACHE_URL"  # redis://host:port/db: the default cache becomes that Redis
LEASE_TTL_S = 30.0  # renewed every third of it while held: a holder that dies frees the step within this
MIN_FREE_BYTES = 16 * 2**20  # below this a run would fill the disk within minutes: say so before judging
FIX = "choose another with --cache-dir or $REFLECTAGENT_CACHE_DIR, or judge without it (--no-cache)"


class CacheUnusable(ReflectAgentError):
    """The cache cannot be written (read-only, full, not a folder, Redis away): found before any judging."""


class DiskStore:
    """Steps in a diskcache folder (SQLite underneath): one machine, any number of processes. Leases live
    in their own small cache (``.leases/``), so they never count as steps."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._cache: diskcache.Cache | None = None
        self._leases: diskcache.Cache | None = None

    @property
    def cache(self) -> diskcache.Cache:
        if self._cache is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(self.directory), size_limit=2**34, eviction_policy="none")
        return self._cache

    @property
    def leases(self) -> diskcache.Cache:
        if self._leases is None:
            self._leases = diskcache.Cache(str(self.directory / ".leases"), eviction_policy="none")
        return self._leases

    def where(self) -> str:
        return str(self.directory)

    def check(self) -> None:
        """Write, read and delete a probe row and look at the free space, so a cache that cannot keep steps
        fails at start, not after an hour of judging that it then cannot save."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = f"probe:{uuid.uuid4().hex}"
            self.cache.set(probe, b"x" * 4096, retry=True)
            self.cache.delete(probe, retry=True)
            free = shutil.disk_usage(self.directory).free
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self.close()
            raise CacheUnusable(
                f"the judgment cache folder {self.directory} cannot be written ({type(exc).__name__}: {exc}): {FIX}"
            ) from exc
        if free < MIN_FREE_BYTES:
            raise CacheUnusable(
                f"the judgment cache folder {self.directory} has {free // 1024} KiB free, less than "
                f"{MIN_FREE_BYTES // 2**20} MiB: free some space or {FIX}"
            )

    def get(self, key: str) -> dict | None:
        return self.cache.get(key, retry=True)

    def set(self, key: str, row: dict) -> None:
        self.cache.set(key, row, retry=True)

    # retry=True: under many writers SQLite is busy now and then, and a claim must wait, not fail. Renew and
    # release read, then write, outside a transaction: in the rare race (our lease lapsed and was taken in
    # between) another process's lease is extended or freed, which can only cost a duplicate call.
    def claim(self, name: str, token: str, ttl_s: float) -> bool:
        return self.leases.add(name, token, expire=ttl_s, retry=True)

    def renew(self, name: str, token: str, ttl_s: float) -> bool:
        return self.leases.get(name, retry=True) == token and self.leases.touch(name, expire=ttl_s, retry=True)

    def release(self, name: str, token: str) -> None:
        if self.leases.get(name, retry=True) == token:
            self.leases.delete(name, retry=True)

    def __len__(self) -> int:
        return len(self.cache) if self.directory.exists() else 0

    def volume(self) -> int:
        return self.cache.volume() if self.directory.exists() else 0

    def clear(self) -> int:
        return self.cache.clear() if self.directory.exists() else 0

    def close(self) -> None:
        for cache in (self._cache, self._leases):
            if cache is not None:
                cache.close()
        self._cache = self._leases = None


class RedisStore:
    """Steps in Redis, for many machines: the same keys (under a prefix), stored as JSON (never pickle: a
    shared store must not be able to run code here), claims by ``SET NX PX`` and compare-and-delete."""

    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
    )
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, url: str, prefix: str = "reflectagent:"):
        import redis

        self.url, self.prefix = url, prefix
        # timeouts: steps read and write the store on their event loop, so a stalled Redis must fail, not hang
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)

    def where(self) -> str:
        return self.url.split("@")[-1]  # never a password from the URL

    def check(self) -> None:
        import redis

        try:
            self.client.ping()
            probe = f"{self.prefix}probe:{uuid.uuid4().hex}"
            self.client.set(probe, "x", px=10_000)
            self.client.delete(probe)
        except redis.RedisError as exc:
            raise CacheUnusable(
                f"the Redis cache at {self.where()} cannot be used ({type(exc).__name__}: {exc}): "
                "start it, fix cache_url or $REFLECTAGENT_CACHE_URL, or judge without a cache (--no-cache)"
            ) from exc

    def get(self, key: str) -> dict | None:
        value = self.client.get(self.prefix + key)
        return None if value is None else json.loads(value)

    def set(self, key: str, row: dict) -> None:
        self.client.set(self.prefix + key, json.dumps(row, ensure_ascii=False))

    def claim(self, name: str, token: str, ttl_s: float) -> bool:
        return bool(self.client.set(self.prefix + name, token, nx=True, px=int(ttl_s * 1000)))

    def renew(self, name: str, token: str, ttl_s: float) -> bool:
        return bool(self.client.eval(self._RENEW, 1, self.prefix + name, token, int(ttl_s * 1000)))

    def release(self, name: str, token: str) -> None:
        self.client.eval(self._RELEASE, 1, self.prefix + name, token)

    def _keys(self):
        return self.client.scan_iter(match=self.prefix + "*", count=1000)

    def __len__(self) -> int:
        return sum(1 for key in self._keys() if not key.startswith(self.prefix + "lease:"))

    def volume(self) -> int:
        return sum(self.client.memory_usage(key) or 0 for key in self._keys())

    def clear(self) -> int:
        keys = list(self._keys())
        return self.client.delete(*keys) if keys else 0

    def close(self) -> None:
        self.client.close()


class Lease:
    """A claim, stored in the cache, on making one step: only one process (on any machine sharing the
    store) gets it. While held it is renewed (by the process's one renewer thread), so a long step keeps
    it and a crashed holder loses it within ``ttl_s``; release removes it only if it is still ours.
    Neither acquiring nor releasing waits for a thread: both run on the event loop of the steps."""

    def __init__(self, store: DiskStore | RedisStore, key: str, ttl_s: float):
        self.store, self.name, self.ttl_s = store, f"lease:{key}", ttl_s
        self.token = uuid.uuid4().hex
        self.renewed = 0.0

    def acquire(self) -> bool:
        if not self.store.claim(self.name, self.token, self.ttl_s):
            return False
        self.renewed = time.monotonic()
        _renewer.hold(self)
        return True

    def renew(self) -> bool:
        self.renewed = time.monotonic()
        return self.store.renew(self.name, self.token, self.ttl_s)

    def release(self) -> None:
        if _renewer.drop(self):
            self.store.release(self.name, self.token)


class _Renewer:
    """One daemon thread per process renews every held lease a third of its life after the last renewal.
    A renewal that races a release finds the token gone and changes nothing (compare-and-touch)."""

    def __init__(self):
        self._held: dict[int, Lease] = {}
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, lease: Lease) -> None:
        with self._guard:
            self._held[id(lease)] = lease
            if self._thread is None or not self._thread.is_alive():  # first lease, or a forked child
                self._thread = threading.Thread(target=self._run, name="reflectagent-leases", daemon=True)
                self._thread.start()

    def drop(self, lease: Lease) -> bool:
        with self._guard:
            return self._held.pop(id(lease), None) is not None

    def _run(self) -> None:
        while True:
            with self._guard:
                held = list(self._held.values())
            now = time.monotonic()
            for lease in held:
                if now - lease.renewed < lease.ttl_s / 3:
                    continue
                try:
                    if not lease.renew():
                        self.drop(lease)  # expired and taken by another process: nothing of ours to renew
                except Exception as exc:  # the store hiccupped (Redis away, SQLite busy): try again next round
                    logger.warning("could not renew a lease: %s", exc)
            time.sleep(min([lease.ttl_s / 6 for lease in held] + [0.5]))


_renewer = _Renewer()


def _forget_in_child() -> None:
    """A forked child holds none of its parent's leases (nor a lock a parent's thread held as it forked)."""
    global _renewer, _defaults_lock
    _renewer = _Renewer()
    _defaults_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def step_key(**parts: Any) -> str:
    payload = json.dumps({"v": SCHEMA_VERSION, **parts}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Steps keyed by :func:`step_key`, in a diskcache folder (the default) or, given ``url``
    (``redis://host:port/db``), in Redis shared by many machines. ``enabled=False`` makes every lookup miss."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True, url: str | None = None):
        self.directory = None if url else Path(directory) if directory else judgments_dir()
        self.enabled = enabled
        self.store: DiskStore | RedisStore = RedisStore(url) if url else DiskStore(self.directory)

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

    def check(self) -> JudgmentCache:
        """Raise :class:`CacheUnusable` now if steps could not be saved (a disabled cache needs nothing)."""
        if self.enabled:
            self.store.check()
        return self

    def lease(self, key: str) -> Lease:
        """A claim on making the step ``key`` (see :class:`Lease`); ``$REFLECTAGENT_LEASE_TTL_S`` sets its life."""
        return Lease(self.store, key, float(os.environ.get(LEASE_TTL_ENV) or LEASE_TTL_S))

    def __len__(self) -> int:
        return len(self.store)

    def info(self) -> dict[str, Any]:
        return {
            "directory": self.store.where(),
            "enabled": self.enabled,
            "entries": len(self),
            "bytes": self.store.volume(),
        }

    def clear(self) -> int:
        return self.store.clear()

    def close(self) -> None:
        self.store.close()


class NotCached(ReflectAgentError):
    """A step that a :class:`CacheOnly` view does not hold: it would have to be made, and the view makes none."""


class CacheOnly:
    """A view of ``cache`` that answers every step it holds and makes none: the claim that every step takes
    before it is made (:meth:`lease`) raises :class:`NotCached` instead, so a judge run under it (``use_cache``)
    either rebuilds its judgment from cached steps or raises, and calls no LM. Keys are the steps' own: the
    view reads through the cache's ``get``, never computes one. What mining the cache for hard examples uses."""

    enabled = True

    def __init__(self, cache: JudgmentCache):
        self.cache = cache

    def get(self, key: str) -> StepOutput | None:
        return self.cache.get(key) if self.cache.enabled else None

    def put(self, key: str, step: StepOutput) -> None:
        raise NotCached("a cache-only view keeps no new step")

    def lease(self, key: str) -> Lease:
        raise NotCached(f"step {key[:12]} is not in the judgment cache ({self.cache.store.where()})")

    def check(self) -> CacheOnly:
        return self


def configured_cache(settings: Settings, directory: str | Path | None = None, enabled: bool = True) -> JudgmentCache:
    """The judgment cache ``settings`` configure, in the one order every entry point follows: ``directory`` (a
    command's ``--cache-dir``), else the config's ``cache_url`` (Redis), else ``$REFLECTAGENT_CACHE_URL``, else the
    config's ``cache_dir``, else ``$REFLECTAGENT_CACHE_DIR`` or the user folder. Off where ``enabled`` is False
    (``--no-cache``), the config says ``cache = false`` or ``$REFLECTAGENT_CACHE`` is off. A new cache, not checked."""
    return JudgmentCache(
        directory or settings.cache_dir,
        enabled=enabled and _enabled(settings),
        url=None if directory else _url(settings),
    )


def current_cache(lm: Any = None) -> JudgmentCache:
    """The cache in force: set by :func:`use_cache`, else the one the settings in force configure
    (:func:`configured_cache`; see :func:`_settings_in_force`, ``lm`` the LM a step is made with where it is not
    DSPy's LM in force). One cache per place (its Redis, or its folder: ``$REFLECTAGENT_CACHE_DIR`` included),
    opened on first use and kept."""
    cache = _current.get()
    if cache is not None:
        return cache
    settings = _settings_in_force(lm)
    url = _url(settings)
    key = (
        url,
        None if url else Path(settings.cache_dir) if settings.cache_dir else judgments_dir(),
        _enabled(settings),
    )
    cache = _defaults.get(key)
    if cache is None:
        with _defaults_lock:
            cache = _defaults.get(key)
            if cache is None:
                cache = _defaults[key] = configured_cache(settings)
    return cache


def _settings_in_force(lm: Any = None) -> Settings:
    """The settings that place the cache: the enclosing ``backend()`` block's, else those the LM was resolved from
    (``lm``, else DSPy's LM in force: a caller that passed its settings to ``resolve_backend`` and runs under
    ``dspy.context(lm=...)``, as ``run_eval(settings=...)`` does), else the config file's (read once, and only here:
    a config file nobody asked for is not read, nor refused, where settings were given)."""
    global _file_settings
    from reflectagent.calling.config import Settings, load_settings, settings_in_force  # pydantic, on first use only

    settings = settings_in_force()
    if settings is not None:
        return settings
    if lm is None:  # DSPy's LM in force, read where DSPy is loaded (no LM can be in force where it is not)
        dspy = sys.modules.get("dspy")
        lm = getattr(getattr(dspy, "settings", None), "lm", None)
    resolved = getattr(
        getattr(lm, "backend", None), "settings", None
    )  # steps.backend_of, then what it was resolved from
    if isinstance(resolved, Settings):
        return resolved
    if _file_settings is None:
        _file_settings = load_settings()
    return _file_settings


def _url(settings: Settings) -> str | None:
    return settings.cache_url or os.environ.get(CACHE_URL_ENV) or None


def _enabled(settings: Settings) -> bool:
    return settings.cache and not _off_by_env()


def _off_by_env() -> bool:
    return os.environ.get("REFLECTAGENT_CACHE", "").lower() in {"0", "off", "false", "no"}


def caching(lm: Any = None) -> bool:
    """Whether finished steps are being kept (the cache in force is on), without opening the default cache: what
    an error may promise about resuming (``--no-cache`` keeps nothing, so a re-run starts over)."""
    cache = _current.get()  # not ``or``: an empty cache has len() 0, and is falsy
    return cache.enabled if cache is not None else _enabled(_settings_in_force(lm))


@contextlib.contextmanager
def use_cache(cache: JudgmentCache):
    token = _current.set(cache)
    try:
        yield cache
    finally:
        _current.reset(token)
