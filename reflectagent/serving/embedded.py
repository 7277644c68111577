"""Which vLLM server answers for the embedded model: one already running, or one started here (and the same for
llama.cpp's server, started here only).

In order: ``$REFLECTAGENT_EMBEDDED_URL`` names a server; ``reflectagent serve`` published one
in the state file; otherwise this process starts its own, shared by every backend that needs
the same model folder and adapters, and stops it when the process ends (and, where Linux
allows, the server dies with the process). The state file is one small JSON object written
by :func:`publish` and removed by :func:`withdraw`; nothing else reads or writes it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from reflectagent.errors import ConfigError
from reflectagent.paths import server_dir
from reflectagent.serving.llama_cpp import ENGINE, GGUFModel, LlamaCppSpec
from reflectagent.serving.models import default_dtype
from reflectagent.serving.server import ServerSpec, VLLMServer, served_models
from reflectagent.serving.sources import DEFAULT_CONTEXT, DEFAULT_DTYPE

logger = logging.getLogger(__name__)

EMBEDDED_URL_ENV = "REFLECTAGENT_EMBEDDED_URL"
SERVED_NAME = "embedded"  # the model name the embedded server answers to

_servers: dict[str, VLLMServer] = {}
_servers_lock = threading.Lock()


def state_file() -> Path:
    return server_dir() / "embedded.json"


def publish(url: str, loras: dict[str, str], dtype: str) -> None:
    """Announce a running embedded server (``reflectagent serve``) to other processes."""
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps({"url": url, "loras": loras, "dtype": dtype}))


def withdraw(url: str) -> None:
    """Remove the announcement, if it is still ours: another ``serve`` may have replaced it."""
    if published_url() == url:
        state_file().unlink(missing_ok=True)


def published() -> dict | None:
    """The announcement of ``reflectagent serve``: url, loras, dtype."""
    if not state_file().exists():
        return None
    try:
        state = json.loads(state_file().read_text())
        state["url"]  # noqa: B018 - the one key every announcement has
        return state
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring an unreadable %s", state_file())
        return None


def published_url() -> str | None:
    return (published() or {}).get("url")


def _stop_all() -> None:
    with _servers_lock:
        for server in _servers.values():
            server.stop()
        _servers.clear()


def answers_for(url: str, model_dir: Path, loras: dict[str, str], max_model_len: int) -> bool:
    """Whether the server at ``url`` serves this very model folder, with this context and these adapters:
    another model under the embedded name would have its judgments cached as this one's."""
    models = served_models(url)
    base = (models or {}).get(SERVED_NAME)
    return (
        base is not None
        and all(name in models for name in loras)
        and Path(base.get("root") or "").resolve() == Path(model_dir).resolve()
        and base.get("max_model_len", max_model_len) == max_model_len
    )


def embedded_url(
    model_dir: Path, loras: dict[str, str], max_model_len: int = DEFAULT_CONTEXT, dtype: str = DEFAULT_DTYPE
) -> str:
    """A server answering for the embedded model and ``loras``: reused if running, else started.

    A server named by ``$REFLECTAGENT_EMBEDDED_URL`` is trusted to compute in ``dtype`` (vLLM does not
    say); one announced by ``reflectagent serve`` is reused only with the same dtype.
    """
    named = os.environ.get(EMBEDDED_URL_ENV)
    announced = published()
    if announced and announced.get("dtype", DEFAULT_DTYPE) != dtype:
        announced = None
    for url in filter(None, (named, (announced or {}).get("url"))):
        if answers_for(url, model_dir, loras, max_model_len):
            return url
    if named:
        raise ConfigError(
            f"${EMBEDDED_URL_ENV}={named} does not serve {model_dir} as {SERVED_NAME!r} with a "
            f"{max_model_len}-token context and adapters {sorted(loras)}: start it so, or unset the "
            "variable to let reflectagent start a server"
        )
    spec = ServerSpec(
        model_dir=str(model_dir), served_name=SERVED_NAME, loras=dict(loras), max_model_len=max_model_len, dtype=dtype
    )
    return _started(json.dumps([str(model_dir), sorted(loras.items()), max_model_len, dtype]), spec)


def llama_cpp_url(model: GGUFModel) -> str:
    """A ``llama-server`` answering for ``model`` (its GGUF, adapter and context) under the embedded model's name:
    started by this process on first use and shared by every backend that serves the same, as vLLM's is. It is
    never looked for elsewhere: ``reflectagent serve`` and ``$REFLECTAGENT_EMBEDDED_URL`` are vLLM's (name a
    running llama-server with ``api_base`` instead)."""
    spec = LlamaCppSpec(
        gguf=str(model.path),
        served_name=SERVED_NAME,
        lora=str(model.lora) if model.lora else None,
        max_model_len=model.context,
    )
    return _started(json.dumps([ENGINE, str(model.path), spec.lora, model.context]), spec)


def _started(key: str, spec) -> str:
    """The URL of this process's server for ``key``, started from ``spec`` the first time (stopped at exit)."""
    with _servers_lock:
        if key not in _servers:
            if not _servers:
                atexit.register(_stop_all)
            server = VLLMServer(spec, die_with_parent=True)
            server.start()
            _servers[key] = server
        return _servers[key].url


@contextmanager
def serving(
    model_dir: str | Path,
    loras: dict[str, str] | None = None,
    *,
    log_path: Path | None = None,
    max_model_len: int = DEFAULT_CONTEXT,
    max_lora_rank: int = 64,
    dtype: str | None = None,
):
    """A server for ``model_dir`` under the embedded model's name, for the ``with`` block only
    (``dtype``: default the model preset's, as the embedded backend would serve it)."""
    spec = ServerSpec(
        model_dir=str(model_dir),
        served_name=SERVED_NAME,
        loras=dict(loras or {}),
        max_model_len=max_model_len,
        max_lora_rank=max_lora_rank,
        dtype=dtype or default_dtype(model_dir),
    )
    with VLLMServer(spec, log_path=log_path, die_with_parent=True) as server:
        yield server.url
