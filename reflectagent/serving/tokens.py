"""How many tokens a request takes on the model that will read it, so inputs fit its context.

A character budget cannot keep a request inside a served model's context: code, maths and
non-English text take far more tokens per character than prose, and a request the server
refuses as too long is a lost judgment. Two counters, each exact for the model it counts for:
the tokenizer and chat template of a local model folder (the embedded server's), and vLLM's own
``/tokenize`` endpoint for any other vLLM server. API models keep a character budget.

An OpenAI-compatible server that is not vLLM (llama.cpp's routes differ) or a proxy in front of one may
lack ``/v1/models`` and ``/tokenize``: asking them then raises :class:`RouteMissing`, and the backend
falls back to its configured context and its character budget (``backends.Backend``), with a warning.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from reflectagent.errors import ReflectAgentError
from reflectagent.serving.loopback import httpx_options

Messages = list[dict[str, str]]
TokenCounter = Callable[[Messages], int]
Headers = tuple[tuple[str, str], ...]  # HTTP headers, hashable (``server_context`` is memoised)
MISSING_STATUS = (
    404,
    405,
    501,
)  # what a server without a route answers (not found, method not allowed, not implemented)


class RouteMissing(ReflectAgentError):
    """A server without one of vLLM's own routes (``GET /v1/models``, ``POST /tokenize``): it answers 404, 405 or
    501 there, or something that is not vLLM's reply (a proxy's HTML page, llama.cpp's other shape)."""

    def __init__(self, route: str, url: str, why: str):
        super().__init__(f"the server has no {route} as vLLM serves it ({why}, {url})")
        self.route, self.url, self.why = route, url, why


def missing_route(route: str, url: str, status: int) -> RouteMissing | None:
    """:class:`RouteMissing` for a reply of ``status`` that says the route is not there; None otherwise."""
    return RouteMissing(route, url, f"HTTP {status}") if status in MISSING_STATUS else None


def read_reply(route: str, url: str, response: httpx.Response, read: Callable):
    """``read(response.json())``; :class:`RouteMissing` for a route that is not there or a reply not of vLLM's shape.
    Any other failed status raises as ``raise_for_status`` does (a server error, a refused key: not a missing route)."""
    missing = missing_route(route, url, response.status_code)
    if missing is not None:
        raise missing
    response.raise_for_status()
    try:
        return read(response.json())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        kind = response.headers.get("content-type") or "no content-type"
        raise RouteMissing(
            route, url, f"HTTP {response.status_code}, {kind}: not vLLM's reply ({type(exc).__name__})"
        ) from None


@dataclass(frozen=True)
class InputBudget:
    """What a request's inputs must fit: ``chars`` of input text, and/or a whole prompt of at most
    ``tokens`` tokens as counted by ``count`` (the context length less the completion's room)."""

    chars: int | None = None
    tokens: int | None = None
    count: TokenCounter | None = None

    @property
    def counts_tokens(self) -> bool:
        return self.tokens is not None and self.count is not None


_tokenizers: dict[str, object] = {}
_tokenizers_lock = threading.Lock()


def folder_counter(model_dir: str | Path) -> TokenCounter:
    """Tokens of the chat-templated prompt, as vLLM renders it for this model folder."""
    key = str(Path(model_dir).resolve())

    def count(messages: Messages) -> int:
        with _tokenizers_lock:
            if key not in _tokenizers:
                from transformers import AutoTokenizer

                _tokenizers[key] = AutoTokenizer.from_pretrained(key)
        ids = _tokenizers[key].apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        return len(ids)

    return count


def tokenize_url(api_base: str) -> str:
    return api_base.rstrip("/").removesuffix("/v1") + "/tokenize"


def server_counter(api_base: str, model: str, timeout_s: float = 30, headers: Headers = ()) -> TokenCounter:
    """Tokens as a vLLM server counts them (``POST /tokenize`` with the chat messages), over one kept client
    per process: ``httpx.post`` built a client, and its SSL context, for every count (27 ms of CPU a step).
    ``headers`` go with every count (the backend's: a gateway may refuse a request without them); a server on this
    machine is asked directly, never through the environment's proxy (:mod:`~reflectagent.serving.loopback`), as
    :func:`server_context` asks it; :class:`RouteMissing` where the server has no such route."""
    url = tokenize_url(api_base)
    kept: list = [None, None]  # the process that made the client, the client (a forked child makes its own)

    def count(messages: Messages) -> int:
        if kept[0] != os.getpid():
            kept[:] = [os.getpid(), httpx.Client(timeout=timeout_s, headers=dict(headers), **httpx_options(url))]
        response = kept[1].post(url, json={"model": model, "messages": messages, "add_generation_prompt": True})
        return read_reply("POST /tokenize", url, response, lambda reply: int(reply["count"]))

    return count


def first_answering(endpoints: list[str], ask):
    """``ask(endpoint)`` of the first endpoint that answers (replicas serve the same model); the last
    endpoint's error when none does."""
    for endpoint in endpoints[:-1]:
        try:
            return ask(endpoint)
        except httpx.TransportError:
            continue
    return ask(endpoints[-1])


def pool_counter(api_bases: list[str], model: str, timeout_s: float = 30, headers: Headers = ()) -> TokenCounter:
    """:func:`server_counter` over replicas: counted by the first that answers."""
    counters = {base: server_counter(base, model, timeout_s, headers) for base in api_bases}
    return lambda messages: first_answering(api_bases, lambda base: counters[base](messages))


@functools.lru_cache(maxsize=64)
def server_context(api_base: str, model: str, timeout_s: float = 30, headers: Headers = ()) -> int | None:
    """The context length a vLLM server reports for ``model`` (``max_model_len`` in ``/v1/models``; a LoRA
    adapter's is its base model's); None where it lists no length for it. ``headers`` go with the request;
    :class:`RouteMissing` where the server has no such route."""
    url = api_base.rstrip("/") + "/models"
    response = httpx.get(url, timeout=timeout_s, headers=dict(headers), **httpx_options(url))
    listed = read_reply("GET /v1/models", url, response, lambda reply: list(reply.get("data") or []))
    entries = {entry.get("id"): entry for entry in listed if isinstance(entry, dict)}
    entry = entries.get(model) or {}
    if not entry.get("max_model_len") and entry.get("parent") in entries:
        entry = entries[entry["parent"]]
    return int(entry["max_model_len"]) if entry.get("max_model_len") else None
