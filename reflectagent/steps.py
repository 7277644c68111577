"""One cached, accounted predictor call: the single place a judge talks to an LM.

Every module in reflectagent runs its ``dspy.Predict`` through :func:`arun_step` (or
:func:`run_step`, which wraps it for callers without an event loop), which
fits long inputs into the backend's context, looks the step up in the judgment cache,
measures tokens and latency, turns an unparseable output into an honest failed step (never
a default verdict) and reads the verdict's token probabilities when the backend sends them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import re
import threading
import time
from typing import Any, get_args

import dspy
from dspy.utils.exceptions import (
    AdapterParseError,
    ContextWindowExceededError,
    LMInvalidRequestError,
    LMUnsupportedModelError,
)
from dspy.utils.usage_tracker import track_usage

from reflectagent.adapter import JudgeAdapter
from reflectagent.cache import current_cache, step_key
from reflectagent.concurrency import run_sync
from reflectagent.errors import ReflectAgentError
from reflectagent.results import StepOutput, Usage
from reflectagent.tokens import InputBudget

logger = logging.getLogger(__name__)

# Errors that belong to one request (its size or content), not to the backend: the step fails, the
# run goes on, and the failure is cached (the same request would be refused again). Anything else
# (a dead server, a timeout, a model name the endpoint does not serve) propagates uncached, so a
# re-run retries it and nothing is lost.
PER_REQUEST_ERRORS = (ContextWindowExceededError, LMInvalidRequestError)
BACKEND_ERRORS = (LMUnsupportedModelError,)  # invalid-request errors that are the endpoint's, not the request's


def backend_of(lm: dspy.BaseLM) -> Any:
    """The backend description an LM carries (set by :mod:`reflectagent.backends`), if any."""
    return getattr(lm, "backend", None)


def lm_identity(lm: dspy.BaseLM) -> dict[str, Any]:
    backend = backend_of(lm)
    if backend is not None:
        return backend.identity
    secret = {"api_key", "api_base", "base_url"}
    return {"model": lm.model, "kwargs": {k: v for k, v in lm.kwargs.items() if k not in secret}}


def _choice_logprobs(logprobs: dict | None, signature) -> dict[str, dict[str, float]] | None:
    """For each Literal output field, the probability of each choice at its token.

    The tokens, not the returned text, are searched: a client may re-serialise the JSON.
    Probabilities are normalised over the field's choices (under constrained decoding they
    are the only tokens allowed there).
    """
    content = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    # LiteLLM (a replica pool's Router) hands back pydantic objects where DSPy's own transport gives dicts
    content = [_plain(token) | {"top_logprobs": [_plain(alt) for alt in _plain(token).get("top_logprobs") or []]}
               for token in content]
    starts, text = [], ""
    for token in content:
        starts.append(len(text))
        text += token.get("token", "")
    result: dict[str, dict[str, float]] = {}
    for name, info in signature.output_fields.items():
        choices = [str(c) for c in get_args(info.annotation)]
        match = re.search(rf'"{re.escape(name)}"\s*:\s*"', text)
        if not choices or match is None:
            continue
        index = next((i for i, start in enumerate(starts) if start + len(content[i]["token"]) > match.end()), None)
        if index is None:
            continue
        probs = dict.fromkeys(choices, 0.0)
        for alt in content[index].get("top_logprobs") or [content[index]]:
            token = alt.get("token", "").strip().strip('"')
            if token in probs and alt.get("logprob") is not None and alt["logprob"] > -1e3:
                probs[token] += math.exp(alt["logprob"])
        total = sum(probs.values())
        if total > 0:
            result[name] = {c: p / total for c, p in probs.items()}
    return result or None


def _plain(entry) -> dict:
    return entry if isinstance(entry, dict) else entry.model_dump() if hasattr(entry, "model_dump") else dict(vars(entry))


def _request_settings(lm: dspy.BaseLM, predict: dspy.Predict, sample: int, overrides: dict | None) -> dict[str, Any]:
    backend = backend_of(lm)
    config: dict[str, Any] = {**predict.config, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if backend is not None and backend.logprobs:
        config.update(logprobs=True, top_logprobs=5)
    if backend is not None and backend.seed is not None:
        config["seed"] = backend.seed + sample
    return config


def fit_to_budget(texts: dict[str, str], budget: int | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """Cut the longest texts until all fit in ``budget`` characters; name what was cut.

    Short texts keep everything; the budget left is shared evenly among the long ones, each
    keeping its head and tail around a visible marker, so a judge sees that text is missing.
    """
    if budget is None or sum(map(len, texts.values())) <= budget:
        return dict(texts), ()
    remaining, share = budget, {}
    pending = sorted(texts, key=lambda k: len(texts[k]))
    while pending:
        even = remaining // len(pending)
        name = pending.pop(0)
        share[name] = min(len(texts[name]), even)
        remaining -= share[name]
    fitted, cut = {}, []
    for name, text in texts.items():
        keep = share[name]
        if keep >= len(text):
            fitted[name] = text
            continue
        cut.append(name)
        marker = f"\n[... {len(text) - keep} characters cut to fit the judge's context ...]\n"
        head = max(keep - len(marker), 0) * 2 // 3
        tail = max(keep - len(marker) - head, 0)
        fitted[name] = text[:head] + marker + (text[-tail:] if tail else "")
    return fitted, tuple(cut)


class InputTooLong(ReflectAgentError, ValueError):
    """Even with every input cut to nothing, the request would not fit the model's context."""


def render_request(adapter, signature, inputs: dict[str, str], budget: InputBudget | int | None, demos=()):
    """The inputs cut to the backend's budget (demos share it), the fields that were cut, and the
    chat messages sent. Inference and training data render through this one function, so a
    fine-tuned model is trained on exactly the text it is served.

    A character budget (``budget.chars``, or an int) cuts first. A token budget then measures the
    whole rendered prompt with the model's own count and, if it is too long, searches the largest
    character budget whose prompt fits (an estimate from the text's tokens per character, then
    bisection), so no request is refused for length and little room is left unused.
    ``InputTooLong`` when even inputs cut to their markers do not fit (demos or instructions too long).
    """
    budget = budget if isinstance(budget, InputBudget) else InputBudget(chars=budget)
    chars = budget.chars
    if chars is not None and demos:
        chars = max(chars - sum(len(str(v)) for demo in demos for v in dict(demo).values()), chars // 4)
    fitted, truncated = fit_to_budget(inputs, chars)
    messages = adapter.format(signature, list(demos), fitted)
    if not budget.counts_tokens:
        return fitted, truncated, messages
    used = budget.count(messages)
    if used <= budget.tokens:
        return fitted, truncated, messages

    def render(limit: int):
        cut, names = fit_to_budget(inputs, limit)
        shown = adapter.format(signature, list(demos), cut)
        return cut, names, shown, budget.count(shown)

    length = sum(map(len, fitted.values()))
    overhead = budget.count(adapter.format(signature, list(demos), dict.fromkeys(fitted, "")))
    best, low, high = None, 0, length  # character budgets: ``low`` fits (or is 0), ``high`` does not
    guess = int((budget.tokens - overhead) * length / max(used - overhead, 1) * 0.97)
    for _ in range(10):
        if guess <= low or guess >= high:
            guess = (low + high) // 2
        attempt = render(guess)
        if attempt[3] <= budget.tokens:
            best, low = attempt, guess
        else:
            high = guess
        if best is not None and high - low <= max(high // 50, 16):  # within 2%: good enough, and deterministic
            break
        guess = (low + high) // 2
    if best is None:
        attempt = render(0)
        if attempt[3] > budget.tokens:
            raise InputTooLong(f"the prompt needs {attempt[3]} tokens with every input cut, more than the "
                               f"{budget.tokens} the model's context leaves after the completion: shorten the demos "
                               "or instructions, lower max_tokens, or serve the model with a longer context")
        best = attempt
    return best[0], best[1], best[2]


def refusal_key(key: str, backend) -> str:
    """Where a request the server refused is cached: beside its key, with the context it was refused in,
    so a server given a longer context tries it again."""
    return step_key(refused=key, context=getattr(backend, "context_tokens", None))


def run_step(predict: dspy.Predict, inputs: dict[str, str], *, sample: int = 0, config: dict | None = None,
             adapter: dspy.Adapter | None = None) -> StepOutput:
    """:func:`arun_step`, for callers without an event loop (it runs one)."""
    return run_sync(arun_step(predict, inputs, sample=sample, config=config, adapter=adapter))


async def arun_step(predict: dspy.Predict, inputs: dict[str, str], *, sample: int = 0, config: dict | None = None,
                    adapter: dspy.Adapter | None = None) -> StepOutput:
    """Run ``predict`` on ``inputs`` through the judgment cache (the one path: :func:`run_step` wraps it).

    ``sample`` tells repeated samples of the same step apart; ``config`` overrides request
    settings (e.g. ``temperature`` for extra samples). Both are part of the cache key.
    ``adapter`` renders and parses this step instead of the backend's (a baseline's own prompt).
    The cache is asked first for the request as the character budget renders it, so a re-run of
    steps that needed no token cut counts no tokens (and asks no server to count them).
    """
    lm = predict.lm or dspy.settings.lm
    if lm is None:
        raise RuntimeError("no LM is configured: use reflectagent.backend(...) or dspy.context(lm=...)")
    backend = backend_of(lm)
    adapter = adapter or (backend.adapter() if backend is not None else (dspy.settings.adapter or JudgeAdapter()))
    config = _request_settings(lm, predict, sample, config)
    describe = adapter.describe() if hasattr(adapter, "describe") else type(adapter).__name__
    identity = lm_identity(lm)
    cache = current_cache()

    def keyed(fitted_inputs, cut, messages):
        return fitted_inputs, cut, step_key(lm=identity, adapter=describe, messages=messages, config=config, sample=sample)

    chars = backend.context_chars if backend is not None else None
    request = keyed(*render_request(adapter, predict.signature, inputs, chars, predict.demos))
    # Cache I/O runs on the event loop: a diskcache read is microseconds and a write a tenth of a millisecond,
    # less than handing each to a thread and back (measured: bench/library_overhead.py)
    hit = cache.get(request[2]) if cache.enabled else None
    if hit is not None:
        return _reused(hit, predict, request[0])
    budget = backend.input_budget() if backend is not None else None
    if budget is not None and budget.counts_tokens:
        try:  # counting may ask a server (/tokenize): off the event loop
            request = keyed(*await asyncio.to_thread(render_request, adapter, predict.signature, inputs, budget, predict.demos))
        except InputTooLong as exc:  # deterministic: the same request would never fit, so nothing to retry
            logger.warning("a step cannot fit the model's context: %s", exc)
            return StepOutput(fields=None, raw="", usage=Usage(), error=f"InputTooLong: {exc}", truncated=tuple(inputs))
    inputs, truncated, key = request

    async def make() -> StepOutput:
        if hasattr(lm, "connect"):  # a server started on demand starts here, at the first step the cache cannot answer
            await asyncio.to_thread(lm.connect)
        return await _call(predict, adapter, inputs, config, truncated, key, cache, backend)

    return await _single_flight(key, cache, refusal_key(key, backend), make, lambda hit: _reused(hit, predict, inputs))


def _reused(hit: StepOutput, predict: dspy.Predict, inputs: dict[str, str]) -> StepOutput:
    trace = dspy.settings.trace
    if hit.parsed and trace is not None and dspy.settings.max_trace_size > 0:
        # Optimisers collect demos from traces: a cached step must leave one like a live call, bounded like one.
        if len(trace) >= dspy.settings.max_trace_size:
            trace.pop(0)
        trace.append((predict, dict(inputs), dspy.Prediction(**hit.fields)))
    return hit


_inflight: dict[str, concurrent.futures.Future] = {}  # key -> done when its maker finishes (any thread, any loop)
_inflight_guard = threading.Lock()


def _forget_in_child() -> None:
    """A forked child makes its own steps: its parent's makers will never finish there."""
    global _inflight_guard
    _inflight.clear()
    _inflight_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


LEASE_POLL_S = 0.1


async def _single_flight(key: str, cache, refused_key: str, make, reused) -> StepOutput:
    """The cached step (or its cached refusal), else one ``make()`` for all who need it: concurrent
    identical steps (both presentations of a pair, two programs sharing stage 1, several processes on
    one cache folder) wait for one call instead of each making it. Tasks and threads of a process wait
    on the maker's future; processes on a :class:`reflectagent.cache.Lease` in the cache, whose holder
    dies with it. A maker that fails leaves nothing cached: a waiter then tries itself."""
    def cached():
        refused = cache.get(refused_key)
        if refused is not None and (refused.error or "").startswith("LMUnsupportedModelError"):
            refused = None  # cached by versions before a22440b: the endpoint's fault, not this request's
        return cache.get(key) or refused

    if not cache.enabled:
        return await make()
    hit = cached()
    if hit is not None:
        return reused(hit)
    while True:
        with _inflight_guard:
            running = _inflight.get(key)
            mine = running is None
            if mine:
                running = _inflight[key] = concurrent.futures.Future()
                running.set_running_or_notify_cancel()  # no waiter can cancel it: only its maker ends it
        if not mine:
            # shielded: a waiter that is cancelled stops waiting (its CancelledError propagates); the maker goes on
            await asyncio.shield(asyncio.wrap_future(running))
            hit = cached()
            if hit is not None:
                return reused(hit)
            continue  # its maker failed: try again, likely as the maker
        try:
            lease = cache.lease(key)
            while not lease.acquire():  # another process is making it: wait for its result
                await asyncio.sleep(LEASE_POLL_S)
                if (hit := cached()) is not None:
                    return reused(hit)
            try:
                hit = cached()  # made by another process before our lease
                return reused(hit) if hit is not None else await make()
            finally:
                lease.release()
        finally:
            with _inflight_guard:
                del _inflight[key]
            running.set_result(None)


async def _call(predict: dspy.Predict, adapter, inputs: dict[str, str], config: dict, truncated: tuple[str, ...],
                key: str, cache, backend) -> StepOutput:
    signature = predict.signature
    started = time.perf_counter()
    fields, raw, error, logprobs = None, "", None, None
    with track_usage() as tracker, dspy.context(adapter=adapter):
        try:
            prediction = await predict.acall(**inputs, config=config)
            fields = {name: prediction[name] for name in signature.output_fields}
            meta = prediction.get("logprobs") or {}  # JudgeAdapter puts the raw text here too
            raw = meta.get("text", "") if isinstance(meta, dict) else ""
            logprobs = _choice_logprobs(meta, signature)
        except AdapterParseError as exc:
            raw = exc.lm_response or ""
            error = f"unparsed: {getattr(exc, 'reason', 'the output does not match the signature')}"
        except BACKEND_ERRORS:
            raise
        except PER_REQUEST_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("the server refused a request; the step fails (cached, not retried): %s", error)
    entries = [entry for rows in tracker.usage_data.values() for entry in rows]
    usage = Usage(
        lm_calls=max(len(entries), 1),
        prompt_tokens=sum(e.get("prompt_tokens") or 0 for e in entries),
        completion_tokens=sum(e.get("completion_tokens") or 0 for e in entries),
        latency_s=time.perf_counter() - started,
    )
    step = StepOutput(fields=fields, raw=raw, usage=usage, error=error, logprobs=logprobs, truncated=truncated)
    refused = error is not None and not error.startswith("unparsed")
    # A model's output, parsed or not, is a result; a refusal is final for this request in this context.
    cache.put(refusal_key(key, backend) if refused else key, step)
    return step
