"""Backends by configuration: a name in a TOML/YAML file or the environment, validated by pydantic.

Switching a program from one backend to another is a change here, never in code. The
built-in ``embedded`` backend is the packaged SmolLM2 served by vLLM, and each local model preset
is a built-in backend of the same name; any other backend is a LiteLLM model string with its options. API keys are never stored: ``api_key_env`` names
the environment variable that holds one.
"""

from __future__ import annotations

import contextvars
import os
import re
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reflectagent.errors import ConfigError  # defined below every layer (serving raises it too); found here as ever
from reflectagent.records.reading import ReadLimits
from reflectagent.serving.presets import PRESETS
from reflectagent.serving.sources import DEFAULT_CONTEXT, DEFAULT_DTYPE

CONFIG_ENV = "REFLECTAGENT_CONFIG"
BACKEND_ENV = "REFLECTAGENT_BACKEND"
EMBEDDED = "embedded"
DEFAULT_CONFIG_FILES = ("reflectagent.toml", "reflectagent.yaml", "reflectagent.yml")
MAX_TEXT_CHARS = 480  # constrained output's longest analysis/reflection text (the adapter's default too)
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of text; more is not one (``--config /dev/zero``)
SECRET_WORDS = frozenset({"key", "token", "secret", "password", "passwd", "apikey"})
# names that hold a credential, compared whole (lower case, ``-`` and ``.`` as ``_``): ``extra`` is refused one, at
# any depth (an ``Authorization`` header in ``extra_headers``). Whole names, not words: ``stop_token_ids``,
# ``allowed_token_ids`` and ``prompt_cache_key`` are request options of vLLM and OpenAI, not secrets
CREDENTIAL_NAMES = frozenset(
    {
        "token",
        "access_token",
        "auth_token",
        "bearer_token",
        "refresh_token",
        "id_token",
        "session_token",
        "api_token",
        "api_key",
        "apikey",
        "secret",
        "client_secret",
        "secret_key",
        "private_key",
        "password",
        "passwd",
        "passphrase",
        "credentials",
        "authorization",
        "proxy_authorization",
        "cookie",
    }
)
CREDENTIAL_SUFFIXES = (
    "_api_key",
    "_apikey",
    "_secret",
    "_password",
    "_passwd",
    "_access_token",
    "_auth_token",
    "_bearer_token",
    "_session_token",
    "_refresh_token",
    "_api_token",
    "_secret_key",
    "_secret_access_key",
    "_private_key",
    "_subscription_key",
    "_credentials",
)
# what BackendLM passes to dspy.LM from the backend's own fields: the same name in ``extra`` would be given twice
SET_BY_THE_BACKEND = {
    "model": "model",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
    "num_retries": "num_retries",
    "timeout": "timeout_s",
    "api_base": "api_base",
    "cache": "the judgment cache",
    "engine": "replicas",
    "async_engine": "replicas",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def secret_named(*names: object) -> bool:
    """Whether any of ``names`` (a field, or the path to one) may hold a secret, so an error never shows its value:
    a word of it (split at ``_``, ``-``, ``.``) is key, token, secret or password, or it is a credential's name
    (:func:`credential_named`: ``Authorization``, ``Cookie``). Broader than what ``extra`` refuses: hiding a value
    costs nothing. ``max_tokens`` is not (its word is "tokens")."""
    return any(
        credential_named(name) or any(word in SECRET_WORDS for word in re.split(r"[^a-z0-9]+", str(name).lower()))
        for name in names
    )


def credential_named(name: object) -> bool:
    """Whether ``name`` is the name of a credential (:data:`CREDENTIAL_NAMES`, or one ending in ``_api_key``,
    ``_secret``, ``_password``, ``_access_token`` ...): ``api_key``, ``X-Api-Key``, ``Authorization``,
    ``client_secret``; not ``stop_token_ids``, ``prompt_cache_key`` or ``max_tokens``."""
    normal = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    return normal in CREDENTIAL_NAMES or normal.endswith(CREDENTIAL_SUFFIXES)


def written_secret(table: dict, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path to the first credential written in ``table``: a key of a credential's name holding a value, at any
    depth (``extra_headers.Authorization``, ``extra_body.api_key``); a table under such a name is looked into, not
    refused (a JSON schema may have a property named ``token``), and so are tables in lists."""
    for name, value in table.items():
        here = (*path, str(name))
        if isinstance(value, dict):
            found = written_secret(value, here)
        elif credential_named(name):
            return here
        elif isinstance(value, list):
            found = next(
                (
                    f
                    for i, item in enumerate(value)
                    if isinstance(item, dict)
                    for f in [written_secret(item, (*here, str(i)))]
                    if f
                ),
                None,
            )
        else:
            found = None
        if found:
            return found
    return None


class OverrideError(ConfigError):
    """A change asked of one backend (``judge --dtype``) that it cannot take: the change is what to fix, not the file."""


Dtype = Literal["bfloat16", "float16", "float32"]  # what a served model may compute in
DTYPES: tuple[str, ...] = get_args(Dtype)
Engine = Literal["vllm", "llama.cpp"]  # what serves an embedded backend's model
LLAMA_CPP = "llama.cpp"


class BackendConfig(BaseModel):
    """One backend. ``model`` is a LiteLLM model string, or ``embedded`` for the local server."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="LiteLLM model string (e.g. 'openai/gpt-4o-mini', 'hosted_vllm/judge') or 'embedded'"
    )
    api_base: str | None = Field(None, description="endpoint, e.g. http://127.0.0.1:8000/v1 for a vLLM server")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    replicas: list[str] = Field(
        default_factory=list,
        description=(
            "more endpoints serving the same model as api_base (vLLM replicas): a LiteLLM Router spreads requests over "
            "all of them, retries on another and cools a failing one down; the cache keys on the model, not the replica"
        ),
    )
    routing_strategy: str = Field("simple-shuffle", description="LiteLLM Router strategy, with replicas")
    cooldown_s: float = Field(5.0, ge=0, description="with replicas: how long a failing replica is left out")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, gt=0, description="completion budget per step")
    max_text_chars: int = Field(
        MAX_TEXT_CHARS, gt=0, description="constrained output: longest analysis/reflection text, in characters"
    )
    constrained: bool | None = Field(None, description="JSON-schema-constrained output; default on for vLLM backends")
    logprobs: bool | None = Field(None, description="ask for verdict-token probabilities; default on for vLLM backends")
    context_chars: int | None = Field(None, gt=0, description="input characters a step may use; longer inputs are cut")
    context_tokens: int | None = Field(
        None,
        gt=0,
        description=(
            "the model's context length in tokens: inputs are cut so prompt + max_tokens fit it (counted by the model's "
            "tokenizer: embedded and hosted_vllm backends). Embedded: also the length of the server it starts (default: "
            f"the model preset's, else {DEFAULT_CONTEXT}); hosted_vllm: default asked from the server"
        ),
    )
    timeout_s: float = Field(300.0, gt=0)
    num_retries: int = Field(2, ge=0)
    seed: int | None = Field(None, description="base seed; sample k sends seed + k")
    engine: Engine = Field(
        "vllm",
        description=(
            "embedded only: the local engine that serves the model: vLLM (a Hugging Face folder, converted once from "
            "a preset's GGUF) or llama.cpp (llama-server on the GGUF itself: a preset, a .gguf file or the packaged "
            "SmolLM2); part of the cache identity"
        ),
    )
    model_path: str | None = Field(
        None,
        description="embedded only: base model folder, preset name or (engine llama.cpp) .gguf file "
        "(default: packaged SmolLM2)",
    )
    dtype: Dtype | None = Field(
        None,
        description=(
            f"embedded only: the dtype the server computes in (default: the model preset's, else {DEFAULT_DTYPE}); part of the "
            "cache identity"
        ),
    )
    lora: dict[str, str] = Field(default_factory=dict, description="embedded only: LoRA adapters to serve, NAME -> DIR")
    adapter: str | None = Field(None, description="embedded only: the LoRA adapter (by NAME) to judge with")
    fence_inputs: bool = Field(
        False,
        description=(
            "prompt-injection mitigation: input texts go between <data> fences, inert, and the instructions say they are "
            "material, not instructions (bench/injection.py measures it)"
        ),
    )
    cache_tag: str | None = Field(None, description="extra cache identity, for endpoints whose weights change")
    extra: dict[str, Any] = Field(default_factory=dict, description="more LiteLLM request options")

    @model_validator(mode="after")
    def _check(self) -> BackendConfig:
        secret = written_secret(self.extra)  # never its value: the message names where it is, and the way instead
        if secret:
            raise ValueError(
                f"extra.{'.'.join(secret)}: a secret is never written in the config: put it in an "
                "environment variable and name that variable with api_key_env (the backend sends it as "
                "the provider's key, e.g. Authorization: Bearer)"
            )
        for name in self.extra:  # one line each, before LiteLLM sees it twice ("multiple values")
            if name in SET_BY_THE_BACKEND:
                raise ValueError(
                    f"extra.{name}: set by the backend's own {SET_BY_THE_BACKEND[name]}: write it there, not in extra"
                )
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(
                "api_key_env names an environment variable (letters, digits and _), it does not hold the "
                "key: export the key in a variable and write that variable's name here"
            )
        embedded_only = {
            "model_path": self.model_path,
            "lora": self.lora,
            "adapter": self.adapter,
            "dtype": self.dtype,
            "engine": self.engine != "vllm",
        }
        if self.replicas and not self.api_base:
            raise ValueError("replicas need api_base too: the first endpoint of the pool")
        if self.replicas and self.model == EMBEDDED:
            raise ValueError("replicas are endpoints of served models, not of the embedded backend")
        if self.model != EMBEDDED:
            used = [k for k, v in embedded_only.items() if v]
            if used:
                raise ValueError(f"{', '.join(used)} only apply to the embedded backend")
        if self.max_tokens < self.max_text_chars + 32 and self.constrained is not False and self.is_vllm:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must exceed max_text_chars ({self.max_text_chars}) + 32: "
                "a token can be one character, and a cut-off JSON object loses its verdict"
            )
        if self.context_tokens is not None and self.context_tokens <= self.max_tokens:
            raise ValueError(
                f"context_tokens ({self.context_tokens}) must exceed max_tokens ({self.max_tokens}): "
                "the completion needs room in the context"
            )
        if self.engine == LLAMA_CPP and self.dtype:
            raise ValueError(
                "dtype applies to vLLM: llama.cpp computes in the GGUF's own types (name another .gguf to change "
                'them); to serve this model with vLLM in that dtype, set engine = "vllm" too (judge --engine vllm)'
            )
        if self.engine == LLAMA_CPP and self.lora and not self.adapter:
            raise ValueError(
                "with engine llama.cpp, name the adapter to judge with (adapter = NAME): llama-server applies its "
                "adapter to every request, so each adapter is served by a server of its own"
            )
        if self.adapter and self.adapter not in self.lora:
            raise ValueError(f"adapter {self.adapter!r} is not among lora: {sorted(self.lora)}")
        return self

    @property
    def is_vllm(self) -> bool:
        return self.model == EMBEDDED or self.model.startswith("hosted_vllm/")

    @property
    def headers(self) -> dict[str, Any]:
        """The HTTP headers ``extra`` sends with every request to the backend: ``headers``, then ``extra_headers``
        over them, as LiteLLM merges them for DSPy's path (the config refuses a credential in either)."""
        return {**(self.extra.get("headers") or {}), **(self.extra.get("extra_headers") or {})}


def default_backends() -> dict[str, BackendConfig]:
    """``embedded`` (the packaged SmolLM2) and one backend per local model preset, named as the preset: served by
    llama.cpp where its server is installed, else by vLLM (:func:`preset_engine`)."""
    engine = preset_engine()
    presets = {name: BackendConfig(model=EMBEDDED, model_path=name, engine=engine) for name in PRESETS}
    return {EMBEDDED: BackendConfig(model=EMBEDDED, context_chars=4000), **presets}


def preset_engine() -> Engine:
    """The engine a preset's built-in backend is served by: llama.cpp where ``llama-server`` is installed. On the
    trained preset and 100 test pairs (``bench/engines.py``, bench/README.md *Engines*) it judged as vLLM does in
    the presets' float32 (99 of 100 verdicts the same, +1 pt [0, +3]), 1.14x as fast, in a quarter of the memory,
    ready in 3 s instead of 47, with no conversion or merge to a 7 GB folder first. Else vLLM, as before."""
    from reflectagent.serving.llama_cpp import installed

    return LLAMA_CPP if installed() else "vllm"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_backend: str = EMBEDDED
    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    cache_dir: str | None = None
    cache_url: str | None = Field(
        None,
        description="redis://host:port/db: one judgment cache for many machines "
        "(default: the diskcache folder, or $REFLECTAGENT_CACHE_URL)",
    )
    cache: bool = True
    reading: ReadLimits = Field(
        default_factory=ReadLimits,
        description=(
            "bounds on every data file read (pairs, benchmarks, teacher files): the longest line, the most bytes"
        ),
    )

    @model_validator(mode="after")
    def _merge_defaults(self) -> Settings:
        self.backends = {**default_backends(), **self.backends}
        if self.default_backend not in self.backends:
            raise ValueError(f"default_backend {self.default_backend!r} is not defined")
        return self

    def backend(self, name: str | None = None) -> tuple[str, BackendConfig]:
        name = name or os.environ.get(BACKEND_ENV) or self.default_backend
        if name not in self.backends:
            raise ConfigError(f"unknown backend {name!r}; known: {', '.join(sorted(self.backends))}")
        return name, self.backends[name]

    def overriding(self, name: str | None, **changes: Any) -> Settings:
        """These settings with backend ``name`` (resolved as :meth:`backend` does) changed and made the default,
        re-validated, so a command-line override (``judge --dtype``) gets the same checks as the config file."""
        name, config = self.backend(name)
        try:
            changed = BackendConfig.model_validate({**config.model_dump(exclude_unset=True), **changes})
        except ValidationError as exc:
            problems = "; ".join(line.strip() for line in validation_problems(exc).splitlines())
            raise OverrideError(f"backend {name!r} cannot take {changes}: {problems}") from None
        return self.model_copy(update={"backends": {**self.backends, name: changed}, "default_backend": name})


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (by suffix) or YAML file's top-level mapping, parsed safely; errors say which file and where, never
    quoting a line of it (a syntax error on the line of a key must not print the key). At most
    ``MAX_CONFIG_BYTES`` are read, so a device or an endless pipe is an error, not a hang."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is over 1 MiB: that is not a config file (name the TOML or YAML file)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start + 1}): save it as UTF-8") from None
    is_toml = path.suffix == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:  # its message is the reason and the line and column, never the text
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path} nests tables or lists too deep to read: that is not a config file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table/mapping")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's reason and position, without the snippet of the file its message quotes."""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def validation_problems(exc: ValidationError) -> str:
    """One line per problem: where (``backends.fake.timeout_s``), what is wrong and, for a plain value in a field
    that holds no secret, the value given. A value under a name that says key, token, secret or password is never
    shown (pydantic's own message would print it as ``input_value=``), nor is a whole table."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        if secret_named(*error["loc"]):
            if error["type"] == "extra_forbidden":
                message += (
                    ": a secret is never written in the config: put it in an environment variable and name "
                    "that variable with api_key_env"
                )
        elif isinstance(given, (str, int, float, bool)) and error["type"] != "missing":
            shown = repr(given)
            message += f" (got {shown if len(shown) <= 60 else shown[:60] + '...'})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read ``path``, ``$REFLECTAGENT_CONFIG`` or ``./reflectagent.{toml,yaml}``; else defaults."""
    candidate = path or os.environ.get(CONFIG_ENV)
    if candidate is None:
        candidate = next((f for f in DEFAULT_CONFIG_FILES if Path(f).exists()), None)
    data = read_config_file(Path(candidate)) if candidate else {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {candidate}:\n{validation_problems(exc)}") from None


_in_force: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("reflectagent_settings", default=None)


def settings_in_force() -> Settings | None:
    """The settings of the enclosing ``reflectagent.backend(...)`` block, if one is open: what the backends, the
    cache and everything else read, so one block configures them all alike."""
    return _in_force.get()


@contextmanager
def using_settings(settings: Settings):
    """Make ``settings`` the ones in force for the enclosed code (``reflectagent.backend`` opens this)."""
    token = _in_force.set(settings)
    try:
        yield settings
    finally:
        _in_force.reset(token)
