"""How many tokens a request takes on the model that will read it, so inputs fit its context.

A character budget cannot keep a request inside a served model's context: code, maths and
non-English text take far more tokens per character than prose, and a request the server
refuses as too long is a lost judgment. Two counters, each exact for the model it counts for:
the tokenizer and chat template of a local model folder (the embedded server's), and vLLM's own
``/tokenize`` endpoint for any other vLLM server. API models keep a character budget.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

Messages = list[dict[str, str]]
TokenCounter = Callable[[Messages], int]


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
        ids = _tokenizers[key].apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        return len(ids)

    return count


def server_counter(api_base: str, model: str, timeout_s: float = 30) -> TokenCounter:
    """Tokens as a vLLM server counts them (``POST /tokenize`` with the chat messages), over one kept client
    per process: ``httpx.post`` built a client, and its SSL context, for every count (27 ms of CPU a step)."""
    url = api_base.rstrip("/").removesuffix("/v1") + "/tokenize"
    kept: list = [None, None]  # the process that made the client, the client (a forked child makes its own)

    def count(messages: Messages) -> int:
        if kept[0] != os.getpid():
            kept[:] = [os.getpid(), httpx.Client(timeout=timeout_s)]
        response = kept[1].post(url, json={"model": model, "messages": messages, "add_generation_prompt": True})
        response.raise_for_status()
        return int(response.json()["count"])

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


def pool_counter(api_bases: list[str], model: str, timeout_s: float = 30) -> TokenCounter:
    """:func:`server_counter` over replicas: counted by the first that answers."""
    counters = {base: server_counter(base, model, timeout_s) for base in api_bases}
    return lambda messages: first_answering(api_bases, lambda base: counters[base](messages))


@functools.lru_cache(maxsize=64)
def server_context(api_base: str, model: str, timeout_s: float = 30) -> int | None:
    """The context length a vLLM server reports for ``model`` (``max_model_len`` in ``/v1/models``; a LoRA
    adapter's is its base model's)."""
    response = httpx.get(api_base.rstrip("/") + "/models", timeout=timeout_s)
    response.raise_for_status()
    entries = {entry.get("id"): entry for entry in response.json().get("data", [])}
    entry = entries.get(model) or {}
    if not entry.get("max_model_len") and entry.get("parent") in entries:
        entry = entries[entry["parent"]]
    return int(entry["max_model_len"]) if entry.get("max_model_len") else None
