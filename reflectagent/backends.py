"""Resolve a configured backend name to a ``dspy.LM`` that knows how it should be judged with.

The LM carries its :class:`Backend` (identity for the cache, constrained output, log-probs,
context budget), so ``dspy.context(lm=...)`` is all it takes to switch backends, and two
backends can run side by side in one process. The ``embedded`` backend reuses a running
server (``$REFLECTAGENT_EMBEDDED_URL`` or one started by ``reflectagent serve``) or starts
one for this process and stops it when the process ends.
"""

from __future__ import annotations

import atexit
import contextvars
import ctypes
import hashlib
import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from reflectagent.adapter import JudgeAdapter
from reflectagent.config import EMBEDDED, BackendConfig, ConfigError, Settings, load_settings
from reflectagent.paths import server_dir
from reflectagent.server import ServerSpec, VLLMServer, is_serving

logger = logging.getLogger(__name__)

EMBEDDED_URL_ENV = "REFLECTAGENT_EMBEDDED_URL"
EMBEDDED_SERVED_NAME = "embedded"
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else LiteLLM fetches prices at import


@dataclass(frozen=True)
class Backend:
    name: str
    model: str
    api_base: str | None
    identity: dict[str, Any]
    constrained: bool
    logprobs: bool
    context_chars: int | None
    seed: int | None = None
    max_text_chars: int = 480
    config: BackendConfig | None = field(default=None, compare=False)

    def adapter(self) -> JudgeAdapter:
        return JudgeAdapter(constrained=self.constrained, max_text_chars=self.max_text_chars)


class BackendLM(dspy.LM):
    """A ``dspy.LM`` with the :class:`Backend` it was resolved from (see ``steps.run_step``)."""

    def __init__(self, backend: Backend, config: BackendConfig):
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not api_key:
            raise ConfigError(f"backend {backend.name!r}: ${config.api_key_env} is not set")
        if backend.model.startswith("hosted_vllm/") and not api_key:
            api_key = "not-needed"  # vLLM ignores it; LiteLLM insists on one
        options = {k: v for k, v in {"api_base": backend.api_base, "api_key": api_key}.items() if v}
        super().__init__(
            backend.model, temperature=config.temperature, max_tokens=config.max_tokens, cache=False,
            num_retries=config.num_retries, timeout=config.timeout_s, **options, **config.extra,
        )
        self.backend = backend


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def _fingerprint(folder: str | Path) -> str:
    """Identity of a model folder: every file's name and full contents (memoised by size and mtime).

    Hashing only the head of the weights is not enough: two models fine-tuned from one base
    share their size and their first megabyte (the header and the untouched embeddings), and
    their judgments would be served from one another's cache.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(_file_digest(path).encode())
    return digest.hexdigest()[:16]


# ---- the embedded server -------------------------------------------------------------------

_servers: dict[str, VLLMServer] = {}
_servers_lock = threading.Lock()


def state_file() -> Path:
    return server_dir() / "embedded.json"


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop_all() -> None:
    for server in list(_servers.values()):
        server.stop()
    _servers.clear()


atexit.register(_stop_all)


def embedded_url(model_dir: Path, loras: dict[str, str]) -> str:
    """A server answering for the embedded model and ``loras``: reused if running, else started."""
    wanted = [EMBEDDED_SERVED_NAME, *loras]
    candidates = []
    if os.environ.get(EMBEDDED_URL_ENV):
        candidates.append(os.environ[EMBEDDED_URL_ENV])
    if state_file().exists():
        try:
            candidates.append(json.loads(state_file().read_text())["url"])
        except (OSError, ValueError, KeyError):
            logger.warning("ignoring an unreadable %s", state_file())
    for url in candidates:
        if all(is_serving(url, name) for name in wanted):
            return url
    if os.environ.get(EMBEDDED_URL_ENV):
        raise ConfigError(f"${EMBEDDED_URL_ENV}={os.environ[EMBEDDED_URL_ENV]} does not serve {wanted}")
    key = json.dumps([str(model_dir), sorted(loras.items())])
    with _servers_lock:
        if key not in _servers:
            spec = ServerSpec(model_dir=str(model_dir), served_name=EMBEDDED_SERVED_NAME, loras=dict(loras))
            server = VLLMServer(spec)
            if threading.current_thread() is threading.main_thread():
                # Linux delivers the parent-death signal when the *thread* that started the child
                # ends, so only the main thread may ask for it; atexit covers the other cases.
                server.preexec = die_with_parent
            server.start()
            _servers[key] = server
        return _servers[key].url


def _resolve_embedded(name: str, config: BackendConfig) -> Backend:
    from reflectagent.models import prepare_model

    model_dir = prepare_model(config.model_path)
    loras = {k: str(Path(v).expanduser().resolve()) for k, v in config.lora.items()}
    url = config.api_base or embedded_url(model_dir, loras)
    served = config.adapter or EMBEDDED_SERVED_NAME
    identity = {
        "model": EMBEDDED, "base": _fingerprint(model_dir),
        "adapter": [config.adapter, _fingerprint(loras[config.adapter])] if config.adapter else None,
        "temperature": config.temperature, "max_tokens": config.max_tokens, "tag": config.cache_tag,
    }
    return Backend(
        name=name, model=f"hosted_vllm/{served}", api_base=url, identity=identity,
        constrained=config.constrained is not False, logprobs=config.logprobs is not False,
        context_chars=config.context_chars, seed=config.seed, max_text_chars=config.max_text_chars, config=config,
    )


def _resolve_litellm(name: str, config: BackendConfig) -> Backend:
    identity = {
        "model": config.model, "api_base": config.api_base, "temperature": config.temperature,
        "max_tokens": config.max_tokens, "extra": config.extra, "tag": config.cache_tag,
    }
    default_on = config.is_vllm
    return Backend(
        name=name, model=config.model, api_base=config.api_base, identity=identity,
        constrained=default_on if config.constrained is None else config.constrained,
        logprobs=default_on if config.logprobs is None else config.logprobs,
        context_chars=config.context_chars, seed=config.seed, config=config,
    )


_settings: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("reflectagent_settings", default=None)


def resolve_backend(name: str | None = None, settings: Settings | None = None) -> BackendLM:
    """The LM for backend ``name`` (or ``$REFLECTAGENT_BACKEND``, or the configured default).

    Settings come from the argument, else the enclosing :func:`backend` block, else the
    config file, so a program that names its members' backends finds them in the same config.
    """
    settings = settings or _settings.get() or load_settings()
    name, config = settings.backend(name)
    backend = _resolve_embedded(name, config) if config.model == EMBEDDED else _resolve_litellm(name, config)
    return BackendLM(backend, config)


@contextmanager
def backend(name: str | None = None, settings: Settings | None = None):
    """``with backend("embedded") as lm:`` runs the enclosed judging on that backend."""
    settings = settings or _settings.get() or load_settings()
    lm = resolve_backend(name, settings)
    token = _settings.set(settings)
    try:
        with dspy.context(lm=lm):
            yield lm
    finally:
        _settings.reset(token)
