"""Resolve a configured backend name to a ``dspy.LM`` that knows how it should be judged with.

The LM carries its :class:`Backend` (identity for the cache, constrained output, log-probs,
input budget), so ``dspy.context(lm=...)`` is all it takes to switch backends, and two
backends can run side by side in one process. The ``embedded`` backend finds or starts its
server through :mod:`reflectagent.serving.embedded`, on the first step the cache cannot answer: a
fully cached run starts no server.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dspy

from reflectagent.calling.adapter import JudgeAdapter
from reflectagent.calling.config import (
    EMBEDDED,
    LLAMA_CPP,
    BackendConfig,
    ConfigError,
    Settings,
    load_settings,
    settings_in_force,
    using_settings,
)
from reflectagent.calling.pool import AsyncRouterEngine, RouterEngine, make_router
from reflectagent.calling.prices import remember_unpriced_models
from reflectagent.calling.vllm_client import ChatClient
from reflectagent.serving import llama_cpp
from reflectagent.serving import embedded  # its functions looked up when called (a test stands in for the server)
from reflectagent.serving.models import default_dtype, prepare_model
from reflectagent.serving.server import ServerError
from reflectagent.serving.sources import DEFAULT_DTYPE, default_context, fingerprint, model_identity
from reflectagent.serving.tokens import (
    InputBudget,
    RouteMissing,
    first_answering,
    folder_counter,
    pool_counter,
    server_context,
)

TOKEN_MARGIN = 4  # tokens kept free beside max_tokens, in case a server counts a template token differently

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (backend, route): a missing route is told once per backend and process
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class Backend:
    """A configured backend, resolved: where requests go, and who answers them (``identity``).

    Everything else (constrained output, log-probs, budgets, seed) is read from ``config``,
    never copied, so no option can be lost between the config file and a request.
    """

    name: str
    config: BackendConfig
    model: str  # the LiteLLM model string requests are sent with
    api_base: str | None  # None until connected, for a server started on demand
    identity: dict[str, Any]  # what the judgment cache keys on (never the API key)
    model_dir: Path | None = None  # the served folder, where reflectagent serves it (its tokenizer counts tokens)
    start: Callable[[], str] | None = field(default=None, compare=False, repr=False)  # find or start the server
    # the settings it was resolved from: they place the judgment cache of its steps outside a backend() block
    settings: Settings | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.start is not None and not isinstance(self.start, StartOnce):
            object.__setattr__(self, "start", StartOnce(self.start))  # every caller shares one memory of a failure

    @property
    def constrained(self) -> bool:
        return self.config.is_vllm if self.config.constrained is None else self.config.constrained

    @property
    def logprobs(self) -> bool:
        return self.config.is_vllm if self.config.logprobs is None else self.config.logprobs

    @property
    def top_logprobs(self) -> int:
        """How many of each token's likeliest alternatives to ask for. vLLM reports them after constrained decoding
        has masked what the schema forbids, so at a verdict the few allowed choices lead the list; llama.cpp reports
        the model's own, before its grammar, so a choice the model thinks unlikely can fall behind tokens the schema
        forbids: it is asked for its longest default list."""
        return 20 if self.is_llama_cpp else 5

    @property
    def context_chars(self) -> int | None:
        return self.config.context_chars

    @property
    def seed(self) -> int | None:
        return self.config.seed

    @property
    def max_text_chars(self) -> int:
        return self.config.max_text_chars

    def adapter(self) -> JudgeAdapter:
        return JudgeAdapter(
            constrained=self.constrained, max_text_chars=self.max_text_chars, fence=self.config.fence_inputs
        )

    @functools.cached_property
    def context_tokens(self) -> int | None:
        """The served model's context length, where it can be known (see ``BackendConfig.context_tokens``)."""
        if self.config.context_tokens:
            return self.config.context_tokens
        if self.model_dir is not None:
            return default_context(self.model_dir)
        if self.is_llama_cpp and self.api_base:  # a llama-server run by the user: its slots' context
            return llama_cpp.served_context(self.api_base, self.http_headers)
        if not self.is_hosted_vllm:
            return None
        try:
            return first_answering(
                self.endpoints, lambda base: server_context(base, self.served, headers=self.http_headers)
            )
        except RouteMissing as missing:
            self._without(
                missing,
                "the model's context length is unknown, so prompts are not counted in tokens",
                "context_tokens (the model's context length, where the server counts tokens) or context_chars",
            )
            return None

    @property
    def http_headers(self) -> tuple[tuple[str, str], ...]:
        """What reflectagent's own requests to the server (``/v1/models``, ``/tokenize``) carry besides their body: the
        config's headers (:attr:`BackendConfig.headers`, as the chat requests carry them) and the key, if one is set."""
        headers = {str(k): str(v) for k, v in self.config.headers.items() if v is not None}
        key = os.environ.get(self.config.api_key_env) if self.config.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return tuple(sorted(headers.items()))

    def cannot_count(self, missing: RouteMissing) -> None:
        """The server cannot count tokens (no ``/tokenize``): this backend keeps to its character budget from now on."""
        self.__dict__["_counter"] = None  # what the cached property holds (the dataclass is frozen, its cache is not)
        self.__dict__["_missing"] = missing
        self._without(
            missing,
            f"prompts cannot be counted to fit the {self.context_tokens}-token context",
            "context_chars (each step's input characters)",
        )

    def _without(self, missing: RouteMissing, consequence: str, setting: str) -> None:
        """Say once per backend what the server lacks, what judging does without it, and what to set."""
        with _warned_lock:
            if (self.name, missing.route) in _warned:
                return
            _warned.add((self.name, missing.route))
        chars = self.config.context_chars
        budget = (
            f"inputs are cut to context_chars = {chars} characters"
            if chars
            else "inputs are not cut (no context_chars)"
        )
        logger.warning(
            "backend %r: %s; %s. Judging goes on: %s. Set %s in [backends.%s] to bound the prompt.",
            self.name,
            missing,
            consequence,
            budget,
            setting,
            self.name,
        )

    @property
    def direct(self) -> bool:
        """Whether steps talk to the server with reflectagent's own client (:mod:`reflectagent.calling.vllm_client`)
        rather than through DSPy's: every vLLM backend but a replica pool (LiteLLM's Router spreads those)."""
        return self.config.is_vllm and not self.config.replicas

    @property
    def is_hosted_vllm(self) -> bool:
        return self.model.startswith("hosted_vllm/") and self.api_base is not None

    @property
    def endpoints(self) -> list[str]:
        """Where the model is served: ``api_base``, then a pool's other replicas."""
        return [self.api_base, *self.config.replicas] if self.api_base else list(self.config.replicas)

    @property
    def served(self) -> str:
        return self.model.removeprefix("hosted_vllm/")

    @property
    def is_llama_cpp(self) -> bool:
        return self.config.model == EMBEDDED and self.config.engine == LLAMA_CPP

    @functools.cached_property
    def _counter(self):
        if self.model_dir is not None:
            return folder_counter(self.model_dir)
        if self.is_llama_cpp:  # llama-server's own template and tokenizer; a server started on demand starts here
            return llama_cpp.counter(lambda: self.api_base or self.start(), headers=self.http_headers)
        return pool_counter(self.endpoints, self.served, headers=self.http_headers) if self.is_hosted_vllm else None

    def input_budget(self) -> InputBudget:
        """Characters (``context_chars``) and, where the model's tokenizer is at hand, tokens: the
        context less ``max_tokens``, so no request is refused for length."""
        tokens = None
        if self._counter is not None and self.context_tokens:
            tokens = self.context_tokens - self.config.max_tokens - TOKEN_MARGIN
            if tokens <= 0:
                raise ConfigError(
                    f"backend {self.name!r}: max_tokens ({self.config.max_tokens}) leaves no room for the "
                    f"prompt in a {self.context_tokens}-token context: lower max_tokens or raise context_tokens"
                )
        return InputBudget(chars=self.config.context_chars, tokens=tokens, count=self._count if tokens else None)

    def _count(self, messages) -> int:
        """The prompt's tokens, by the backend's counter. A server without ``/tokenize`` (:class:`RouteMissing`): this
        backend cannot count from now on (:meth:`cannot_count`, told once), and the error goes on to
        :func:`~reflectagent.calling.budget.render_request`, which keeps the request as the character budget renders
        it; so every caller of :meth:`input_budget` (a step, training data) falls back alike. Asked again after
        that (a budget made before), it raises at once, asking the server nothing."""
        counter = self._counter
        if counter is None:
            missing = self.__dict__.get("_missing")
            route, url, why = (
                (missing.route, missing.url, missing.why)
                if missing
                else ("POST /tokenize", str(self.api_base), "no counter")
            )
            raise RouteMissing(route, url, why)  # a new one: one raised object is never shared between threads
        try:
            return counter(messages)
        except RouteMissing as missing:
            self.cannot_count(missing)
            raise


_CLIENT_KEYS = {"api_base", "api_key", "base_url", "timeout", "headers", "extra_headers", "rollout_id", "num_retries"}


class BackendLM(dspy.LM):
    """A ``dspy.LM`` with the :class:`Backend` it was resolved from (see ``steps.run_step``)."""

    def __init__(self, backend: Backend):
        config = backend.config
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not api_key:
            raise ConfigError(f"backend {backend.name!r}: ${config.api_key_env} is not set")
        if backend.model.startswith("hosted_vllm/") and not api_key:
            api_key = "not-needed"  # vLLM ignores it; LiteLLM insists on one
        options = {k: v for k, v in {"api_base": backend.api_base, "api_key": api_key}.items() if v}
        options["timeout"] = config.timeout_s
        if config.replicas:  # a Router owns the connections: DSPy is given the engine, not the endpoint
            router = make_router(
                backend.model,
                [config.api_base, *config.replicas],
                api_key,
                routing_strategy=config.routing_strategy,
                num_retries=config.num_retries,
                cooldown_s=config.cooldown_s,
                timeout_s=config.timeout_s,
            )
            options = {"engine": RouterEngine(router), "async_engine": AsyncRouterEngine(router)}
        super().__init__(
            backend.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            cache=False,
            num_retries=config.num_retries,
            **options,
            **config.extra,
        )
        self.backend = backend
        self._connecting = threading.Lock()
        self._client = None

    @property
    def client(self):
        """The step path's own client for this backend (:class:`reflectagent.calling.vllm_client.ChatClient`), where
        it has one (:attr:`Backend.direct`); None otherwise. The LM itself stays DSPy's: a program or an
        optimiser that calls it directly goes through DSPy, with the same request and the same errors."""
        if self._client is None and self.backend.direct:
            config = self.backend.config
            self._client = ChatClient(
                model=self.model,
                api_key=self.kwargs.get("api_key"),
                timeout_s=config.timeout_s,
                num_retries=config.num_retries,
                headers=config.headers,
            )
        return self._client

    def request_options(self) -> dict[str, Any]:
        """What every request of this LM carries besides its messages (temperature, max_tokens, the config's
        ``extra``), as DSPy would send it; none of the client's settings (endpoint, key, timeout, headers: the
        client sends those itself)."""
        options = {k: v for k, v in self.kwargs.items() if k not in _CLIENT_KEYS and v is not None}
        options.update(options.pop("extra_body", None) or {})  # LiteLLM's and OpenAI's way to add body fields
        return options

    @property
    def api_base(self) -> str | None:
        """Where requests go (a pool's first replica); None for a server not yet needed (every step so far
        came from the cache)."""
        return self.kwargs.get("api_base") or (self.backend.api_base if self.backend.config.replicas else None)

    def connect(self) -> None:
        """Find or start the server before the first request (``run_step`` calls this on a cache miss)."""
        if self.api_base or self.backend.start is None:
            return
        with self._connecting:  # a start that fails is not tried again by every waiting step (StartOnce)
            if not self.api_base:
                self.kwargs["api_base"] = self.backend.start()


def _resolve_embedded(name: str, config: BackendConfig) -> Backend:
    model_dir = prepare_model(config.model_path)
    dtype = config.dtype or default_dtype(model_dir)
    loras = {k: str(Path(v).expanduser().resolve()) for k, v in config.lora.items()}
    identity = {
        "model": EMBEDDED,
        "base": model_identity(model_dir),
        "adapter": [config.adapter, fingerprint(loras[config.adapter])] if config.adapter else None,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "tag": config.cache_tag,
        # the dtype changes the outputs; bfloat16, the first default, stays out so older caches keep their keys
        **({"dtype": dtype} if dtype != DEFAULT_DTYPE else {}),
    }
    backend = Backend(
        name=name,
        config=config,
        model=f"hosted_vllm/{config.adapter or embedded.SERVED_NAME}",
        api_base=config.api_base,
        identity=identity,
        model_dir=model_dir,
    )
    if config.api_base:
        return backend
    # the server is started with the context the budget counts on: one derivation (Backend.context_tokens)
    return replace(
        backend, start=functools.partial(embedded.embedded_url, model_dir, loras, backend.context_tokens, dtype)
    )


def _resolve_llama_cpp(name: str, config: BackendConfig) -> Backend:
    """An embedded backend served by llama.cpp: the GGUF as it ships (:mod:`reflectagent.serving.llama_cpp`). Its
    judgments are keyed on the engine and the GGUF's quantisation too: the same weights judge otherwise there. With
    ``api_base`` (a llama-server run by the user) nothing is fetched or converted here: the server's model is named
    by ``model_path`` as written (and ``cache_tag``), and its context is asked of it."""
    if config.api_base:
        identity = {
            "model": EMBEDDED,
            "engine": llama_cpp.ENGINE,
            "api_base": config.api_base,
            "model_path": config.model_path,
            "adapter": config.adapter,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
            "tag": config.cache_tag,
        }
        return Backend(
            name=name,
            config=config,
            model=f"hosted_vllm/{embedded.SERVED_NAME}",
            api_base=config.api_base,
            identity=identity,
        )
    model = llama_cpp.gguf_model(config.model_path, config.context_tokens)
    if config.adapter:
        if model.lora is not None:
            raise ConfigError(
                f"backend {name!r}: {config.model_path} already carries its own adapter; with engine llama.cpp "
                "name its base preset as model_path to judge with another adapter"
            )
        adapter_dir = Path(config.lora[config.adapter]).expanduser().resolve()
        model = replace(
            model,
            lora=llama_cpp.converted_lora(adapter_dir, model.path, model.identity),
            lora_identity=llama_cpp.lora_identity(adapter_dir),
        )
    identity = {
        "model": EMBEDDED,
        "engine": llama_cpp.ENGINE,
        "base": model.identity,
        "quantisation": model.quantisation,
        "adapter": [config.adapter, model.lora_identity] if model.lora_identity else None,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "tag": config.cache_tag,
    }
    backend = Backend(
        name=name,
        # the server is started with this context, and the budget counts on it (Backend.context_tokens)
        config=config.model_copy(update={"context_tokens": model.context}),
        model=f"hosted_vllm/{embedded.SERVED_NAME}",
        api_base=None,
        identity=identity,
    )
    return replace(backend, start=functools.partial(embedded.llama_cpp_url, model))


class StartOnce:
    """A backend's server start (:attr:`Backend.start` is always one): a start that failed fails again at once,
    without another try, for every caller: the LM's :meth:`BackendLM.connect` and the token counter (which needs
    the server first) alike, at once or later. A failed start costs minutes and rarely heals by itself; a new
    process tries again."""

    def __init__(self, start: Callable[[], str]):
        self.start, self._failed = start, None
        self._lock = threading.Lock()  # callers waiting on a start that fails must not each try again

    def __call__(self) -> str:
        with self._lock:
            if self._failed is not None:
                raise self._again(self._failed)
            try:
                return self.start()
            except Exception as exc:
                self._failed = exc
                raise

    @staticmethod
    def _again(failure: Exception) -> Exception:
        """The same error, a new object (a raised one is never shared by threads: its traceback grows), with the
        first as its cause."""
        try:
            again = copy.copy(failure)  # its type and attributes (an OSError's filename) kept
        except Exception:  # an error class that cannot be copied
            again = ServerError(f"the server failed to start earlier: {failure}")
        again.__cause__ = failure
        return again


def _resolve_litellm(name: str, config: BackendConfig) -> Backend:
    identity = {
        # a pool's replicas serve one model: whichever answers, and however many there are, the step is the same
        "model": config.model,
        "api_base": "replicas" if config.replicas else config.api_base,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "extra": config.extra,
        "tag": config.cache_tag,
    }
    return Backend(name=name, config=config, model=config.model, api_base=config.api_base, identity=identity)


def resolve_backend(name: str | None = None, settings: Settings | None = None) -> BackendLM:
    """The LM for backend ``name`` (or ``$REFLECTAGENT_BACKEND``, or the configured default).

    Settings come from the argument, else the enclosing :func:`backend` block, else the
    config file, so a program that names its members' backends finds them in the same config.
    The backend remembers them (:attr:`Backend.settings`): under ``dspy.context(lm=...)`` they place its
    steps' judgment cache (:func:`reflectagent.calling.cache.current_cache`).
    """
    settings = settings or settings_in_force() or load_settings()
    name, config = settings.backend(name)
    remember_unpriced_models()
    if config.model != EMBEDDED:
        resolve = _resolve_litellm
    else:
        resolve = _resolve_llama_cpp if config.engine == LLAMA_CPP else _resolve_embedded
    return BackendLM(replace(resolve(name, config), settings=settings))


@contextmanager
def backend(name: str | None = None, settings: Settings | None = None):
    """``with backend("embedded") as lm:`` runs the enclosed judging on that backend."""
    settings = settings or settings_in_force() or load_settings()
    lm = resolve_backend(name, settings)
    with using_settings(settings), dspy.context(lm=lm):
        yield lm
