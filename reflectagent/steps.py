"""One cached, accounted predictor call: the single place a judge talks to an LM.

Every module in reflectagent runs its ``dspy.Predict`` through :func:`run_step`, which
fits long inputs into the backend's context, looks the step up in the judgment cache,
measures tokens and latency, turns an unparseable output into an honest failed step (never
a default verdict) and reads the verdict's token probabilities when the backend sends them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from typing import Any, get_args

import dspy
from dspy.utils.exceptions import AdapterParseError, ContextWindowExceededError, LMInvalidRequestError
from dspy.utils.usage_tracker import track_usage

from reflectagent.adapter import JudgeAdapter
from reflectagent.cache import current_cache, step_key
from reflectagent.results import StepOutput, Usage

logger = logging.getLogger(__name__)

# Errors that belong to one request (its size or content), not to the backend: the step fails,
# the run goes on. Anything else (a dead server, a timeout) propagates, so nothing is lost.
PER_REQUEST_ERRORS = (ContextWindowExceededError, LMInvalidRequestError)


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


def render_request(adapter, signature, inputs: dict[str, str], budget: int | None, demos=()):
    """The inputs cut to the backend's budget (demos share it), the fields that were cut, and the
    chat messages sent. Inference and training data render through this one function, so a
    fine-tuned model is trained on exactly the text it is served."""
    if budget is not None and demos:
        budget = max(budget - sum(len(str(v)) for demo in demos for v in dict(demo).values()), budget // 4)
    inputs, truncated = fit_to_budget(inputs, budget)
    return inputs, truncated, adapter.format(signature, list(demos), inputs)


def run_step(predict: dspy.Predict, inputs: dict[str, str], *, sample: int = 0, config: dict | None = None) -> StepOutput:
    """Run ``predict`` on ``inputs`` through the judgment cache.

    ``sample`` tells repeated samples of the same step apart; ``config`` overrides request
    settings (e.g. ``temperature`` for extra samples). Both are part of the cache key.
    """
    lm = predict.lm or dspy.settings.lm
    if lm is None:
        raise RuntimeError("no LM is configured: use reflectagent.backend(...) or dspy.context(lm=...)")
    backend = backend_of(lm)
    adapter = backend.adapter() if backend is not None else (dspy.settings.adapter or JudgeAdapter())
    budget = backend.context_chars if backend is not None else None
    inputs, truncated, messages = render_request(adapter, predict.signature, inputs, budget, predict.demos)
    config = _request_settings(lm, predict, sample, config)
    key = step_key(
        lm=lm_identity(lm),
        adapter=adapter.describe() if hasattr(adapter, "describe") else type(adapter).__name__,
        messages=messages,
        config=config,
        sample=sample,
    )
    cache = current_cache()
    with _single_flight(key, cache) as hit:
        if hit is not None:
            if hit.parsed and dspy.settings.trace is not None:
                # Optimisers collect demos from traces: a cached step must leave one like a live call.
                dspy.settings.trace.append((predict, dict(inputs), dspy.Prediction(**hit.fields)))
            return hit
        return _call(predict, adapter, inputs, config, truncated, key, cache)


_inflight: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, threads using it)
_inflight_guard = threading.Lock()


@contextlib.contextmanager
def _single_flight(key: str, cache):
    """Yield the cached step, or None while holding the key: concurrent identical steps (both
    presentations of a pair, two programs sharing stage 1) wait for one call instead of each
    making it."""
    hit = cache.get(key)
    if hit is not None or not cache.enabled:
        yield hit
        return
    with _inflight_guard:
        lock, users = _inflight.get(key, (threading.Lock(), 0))
        _inflight[key] = (lock, users + 1)
    try:
        with lock:
            yield cache.get(key)
    finally:
        with _inflight_guard:
            lock, users = _inflight[key]
            if users == 1:
                del _inflight[key]
            else:
                _inflight[key] = (lock, users - 1)


def _call(predict: dspy.Predict, adapter, inputs: dict[str, str], config: dict, truncated: tuple[str, ...],
          key: str, cache) -> StepOutput:
    signature = predict.signature
    started = time.perf_counter()
    fields, raw, error, logprobs = None, "", None, None
    with track_usage() as tracker, dspy.context(adapter=adapter):
        try:
            prediction = predict(**inputs, config=config)
            fields = {name: prediction[name] for name in signature.output_fields}
            meta = prediction.get("logprobs") or {}  # JudgeAdapter puts the raw text here too
            raw = meta.get("text", "") if isinstance(meta, dict) else ""
            logprobs = _choice_logprobs(meta, signature)
        except AdapterParseError as exc:
            raw = exc.lm_response or ""
            error = f"unparsed: {getattr(exc, 'reason', 'the output does not match the signature')}"
        except PER_REQUEST_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("a request failed and is reported as unparsed: %s", error)
    entries = [entry for rows in tracker.usage_data.values() for entry in rows]
    usage = Usage(
        lm_calls=max(len(entries), 1),
        prompt_tokens=sum(e.get("prompt_tokens") or 0 for e in entries),
        completion_tokens=sum(e.get("completion_tokens") or 0 for e in entries),
        latency_s=time.perf_counter() - started,
    )
    step = StepOutput(fields=fields, raw=raw, usage=usage, error=error, logprobs=logprobs, truncated=truncated)
    if error is None or error.startswith("unparsed"):
        cache.put(key, step)  # a model's output, parsed or not, is a result; a refused request is not
    return step
