"""One cached, accounted predictor call: the single place a judge talks to an LM.

Every module in reflectagent runs its ``dspy.Predict`` through :func:`arun_step` (or
:func:`run_step`, which wraps it for callers without an event loop), which
fits long inputs into the backend's context (:mod:`~reflectagent.calling.budget`), looks the step up in the
judgment cache, makes it once for all who need it (:mod:`~reflectagent.calling.single_flight`), measures tokens
and latency, turns an unparseable output into an honest failed step (never a default verdict), keeps or
raises a failure by :mod:`~reflectagent.calling.refusals`, and reads the verdict's token probabilities when the
backend sends them (:mod:`~reflectagent.calling.logprobs`). This module holds the call itself: the request,
DSPy's path or the backend's own client, and what DSPy would record of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, get_args

import dspy
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import track_usage

from reflectagent.calling.adapter import JudgeAdapter
from reflectagent.calling.budget import InputTooLong, fit_to_budget, render_request  # noqa: F401 (fit_to_budget: steps' name once)
from reflectagent.calling.cache import current_cache, step_key
from reflectagent.calling.concurrency import run_sync
from reflectagent.calling.logprobs import choice_logprobs
from reflectagent.calling.refusals import (  # noqa: F401 (PER_REQUEST_ERRORS, BACKEND_ERRORS: steps' names once)
    BACKEND_ERRORS,
    PER_REQUEST_ERRORS,
    cached_step,
    keep,
    refusal_key,
    refused,
)
from reflectagent.calling.single_flight import LEASE_POLL_S, single_flight  # noqa: F401 (LEASE_POLL_S: steps' name once)
from reflectagent.calling.vllm_client import PROVIDER
from reflectagent.records.results import StepOutput, Usage
from reflectagent.serving.tokens import InputBudget, RouteMissing

logger = logging.getLogger(__name__)


def backend_of(lm: dspy.BaseLM) -> Any:
    """The backend description an LM carries (set by :mod:`reflectagent.calling.backends`), if any."""
    return getattr(lm, "backend", None)


def lm_identity(lm: dspy.BaseLM) -> dict[str, Any]:
    backend = backend_of(lm)
    if backend is not None:
        return backend.identity
    secret = {"api_key", "api_base", "base_url"}
    return {"model": lm.model, "kwargs": {k: v for k, v in lm.kwargs.items() if k not in secret}}


def _request_settings(lm: dspy.BaseLM, predict: dspy.Predict, sample: int, overrides: dict | None) -> dict[str, Any]:
    backend = backend_of(lm)
    config: dict[str, Any] = {**predict.config, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if backend is not None and backend.logprobs:
        config.update(logprobs=True, top_logprobs=backend.top_logprobs)
    if backend is not None and backend.seed is not None:
        config["seed"] = backend.seed + sample
    return config


def run_step(
    predict: dspy.Predict,
    inputs: dict[str, str],
    *,
    sample: int = 0,
    config: dict | None = None,
    adapter: dspy.Adapter | None = None,
) -> StepOutput:
    """:func:`arun_step`, for callers without an event loop (it runs one)."""
    return run_sync(arun_step(predict, inputs, sample=sample, config=config, adapter=adapter))


async def arun_step(
    predict: dspy.Predict,
    inputs: dict[str, str],
    *,
    sample: int = 0,
    config: dict | None = None,
    adapter: dspy.Adapter | None = None,
) -> StepOutput:
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
    cache = current_cache(lm)

    request_messages: dict[str, list[dict]] = {}

    def keyed(fitted_inputs, cut, messages):
        key = step_key(lm=identity, adapter=describe, messages=messages, config=config, sample=sample)
        request_messages[key] = messages  # what is sent is what is keyed: the direct path sends these
        return fitted_inputs, cut, key

    chars = backend.context_chars if backend is not None else None
    request = keyed(*render_request(adapter, predict.signature, inputs, chars, predict.demos))
    # Cache I/O runs on the event loop: a diskcache read is microseconds and a write a tenth of a millisecond,
    # less than handing each to a thread and back (measured: bench/library_overhead.py)
    hit = cache.get(request[2]) if cache.enabled else None
    if hit is not None:
        return _reused(hit, predict, request[0])
    budget = backend.input_budget() if backend is not None else None
    if (
        budget is not None
        and budget.counts_tokens
        and not await _fits_as_rendered(lm, backend, budget, request[2], request_messages)
    ):
        try:  # counting may ask a server (/tokenize): off the event loop
            request = keyed(
                *await asyncio.to_thread(render_request, adapter, predict.signature, inputs, budget, predict.demos)
            )
        except InputTooLong as exc:  # deterministic: the same request would never fit, so nothing to retry
            logger.warning("a step cannot fit the model's context: %s", exc)
            return StepOutput(fields=None, raw="", usage=Usage(), error=f"InputTooLong: {exc}", truncated=tuple(inputs))
        # a server that cannot count (no /tokenize): render_request kept the request as the character budget renders
        # it, and the backend's counter said so once (Backend._count)
    inputs, truncated, key = request
    messages = request_messages.get(key)

    async def make() -> StepOutput:
        if _connects(lm, backend):  # a server started on demand starts here, at the first step the cache cannot answer
            await asyncio.to_thread(lm.connect)
        if messages is not None and _direct(lm, predict, adapter, config):
            return await _call_direct(lm, predict, adapter, inputs, messages, config, truncated, key, cache, backend)
        return await _call(predict, adapter, inputs, config, truncated, key, cache, backend)

    refused_key = refusal_key(key, backend)
    return await single_flight(
        key, cache, lambda: cached_step(cache, key, refused_key), make, lambda hit: _reused(hit, predict, inputs)
    )


async def _fits_as_rendered(lm, backend, budget: InputBudget, key: str, rendered: dict[str, list[dict]]) -> bool:
    """Whether the request as the character budget rendered it fits the token budget, counted by the vLLM server
    through the backend's own client (no thread, no second client): what :func:`render_request` would find
    first, and then keep. False when it does not fit, or where this cannot be told here (a model folder's
    tokenizer, a pool, a failed count): :func:`render_request` then counts, and cuts, as it always has. True
    where the server has no ``/tokenize`` (:class:`RouteMissing`): the backend keeps to its character budget,
    which rendered this request."""
    client = getattr(lm, "client", None)
    if client is None or backend.model_dir is not None or not backend.is_hosted_vllm or not lm.api_base:
        return False
    if backend.is_llama_cpp:  # llama-server's /tokenize is not vLLM's: its own counter counts in render_request
        return False
    try:
        return await client.count_tokens(lm.api_base, backend.served, rendered[key]) <= budget.tokens
    except RouteMissing as missing:
        backend.cannot_count(missing)
        return True
    except Exception:  # counted again below, where a server that cannot count fails as it always has
        return False


def _connects(lm, backend) -> bool:
    """Whether ``lm.connect`` has anything to do (a thread hop each step otherwise): a backend's LM connects only
    while it has no endpoint and a server to start."""
    if not hasattr(lm, "connect"):
        return False
    return backend is None or not (getattr(lm, "api_base", None) or getattr(backend, "start", None) is None)


def _reused(hit: StepOutput, predict: dspy.Predict, inputs: dict[str, str]) -> StepOutput:
    trace = dspy.settings.trace
    if hit.parsed and trace is not None and dspy.settings.max_trace_size > 0:
        # Optimisers collect demos from traces: a cached step must leave one like a live call, bounded like one.
        if len(trace) >= dspy.settings.max_trace_size:
            trace.pop(0)
        trace.append((predict, dict(inputs), dspy.Prediction(**hit.fields)))
    return hit


_PLAIN_OUTPUTS = (str, int, float, bool)


def _direct(lm, predict: dspy.Predict, adapter, config: dict) -> bool:
    """Whether this step can go straight to the server through the backend's own client (a vLLM backend's:
    :attr:`reflectagent.calling.backends.Backend.direct`) instead of through DSPy's ``Predict``: an adapter that only
    renders and parses (ours, or a plain ``dspy.Adapter`` such as MT-Bench's), outputs of plain types, one
    completion, and nothing that hooks into DSPy's call (callbacks, streaming). Anything else takes DSPy's path,
    which sends the same request and raises the same errors."""
    if getattr(lm, "client", None) is None or not lm.api_base or (config.get("n") or 1) != 1:
        return False
    if not isinstance(adapter, JudgeAdapter):
        if (
            isinstance(adapter, dspy.ChatAdapter)
            or type(adapter)._call_postprocess is not dspy.Adapter._call_postprocess
        ):
            return False
    if lm.callbacks or predict.callbacks or dspy.settings.callbacks or dspy.settings.send_stream is not None:
        return False
    if getattr(predict, "fields", None):  # DSPy's experimental decision fields
        return False
    return all(
        info.annotation in _PLAIN_OUTPUTS or get_args(info.annotation) and _is_literal(info.annotation)
        for info in predict.signature.output_fields.values()
    )


def _is_literal(annotation) -> bool:
    from typing import Literal, get_origin

    return get_origin(annotation) is Literal


async def _call_direct(
    lm,
    predict: dspy.Predict,
    adapter,
    inputs: dict[str, str],
    messages: list[dict],
    config: dict,
    truncated: tuple[str, ...],
    key: str,
    cache,
    backend,
) -> StepOutput:
    """:func:`_call` through the backend's own client: the request DSPy would send (the messages already
    rendered for the key, the LM's options, this step's settings, the adapter's response format), the reply
    parsed by the adapter as DSPy would, the same trace and history entries, the same failures."""
    signature = predict.signature
    started = time.perf_counter()
    body: dict[str, Any] = {
        "model": backend.served,
        "messages": messages,
        **lm.request_options(),
        **{k: v for k, v in config.items() if v is not None},
    }
    response_format = adapter.response_format(signature) if isinstance(adapter, JudgeAdapter) else None
    if response_format is not None:
        body["response_format"] = response_format
    fields, raw, error, logprobs, usage = None, "", None, None, {}
    try:
        reply = await lm.client.complete(lm.api_base, body)
    except BACKEND_ERRORS:
        raise
    except PER_REQUEST_ERRORS as exc:
        error = refused(exc)
    else:
        usage = reply.get("usage") or {}
        _track_usage(lm, usage)
        choice = reply["choices"][0]
        message = choice.get("message") or {}
        raw = message.get("content") or ""
        if choice.get("finish_reason") == "length":
            logger.warning("LM response was truncated; increase max_tokens or inspect history.")
        try:
            fields = _parse(adapter, signature, raw, message)
        except AdapterParseError as exc:
            error = f"unparsed: {getattr(exc, 'reason', 'the output does not match the signature')}"
        else:
            logprobs = choice_logprobs(choice.get("logprobs"), signature)
            _traced(predict, inputs, fields)
        _record_history(lm, messages, body, reply, raw)
    step = StepOutput(
        fields=fields,
        raw=raw,
        error=error,
        logprobs=logprobs,
        truncated=truncated,
        usage=Usage(
            lm_calls=1,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            latency_s=time.perf_counter() - started,
        ),
    )
    keep(cache, key, backend, step)
    return step


def _parse(adapter, signature, text: str, message: dict) -> dict[str, Any]:
    """The output fields, as ``Adapter._call_postprocess`` reads a completion: an empty one is unparsed."""
    if not text:
        raise AdapterParseError(
            adapter_name=type(adapter).__name__,
            signature=signature,
            lm_response=str(message),
            message="The LM returned an empty or null response.",
        )
    value = adapter.parse(signature, text)
    for name in signature.output_fields:
        value.setdefault(name, None)
    return {name: value[name] for name in signature.output_fields}


def _traced(predict: dspy.Predict, inputs: dict[str, str], fields: dict[str, Any]) -> None:
    """What ``Predict`` leaves in DSPy's trace for a call (optimisers collect demos from it), bounded like it."""
    trace = dspy.settings.trace
    if trace is not None and dspy.settings.max_trace_size > 0:
        if len(trace) >= dspy.settings.max_trace_size:
            trace.pop(0)
        trace.append((predict, dict(inputs), dspy.Prediction(**fields)))


def _track_usage(lm, usage: dict) -> None:
    """What DSPy's LM adds to an active ``dspy.track_usage()`` for a call that was answered, parsed or not: the
    reply's ``usage`` as DSPy reads an OpenAI-shaped one (lm15's chat reader, then ``call_result.usage_dict``), so
    a tracker totals the same on either path. A usage that is not counts is left out (DSPy's path refuses that
    reply)."""
    tracker = dspy.settings.usage_tracker
    if tracker is None or not usage:
        return
    from types import SimpleNamespace

    from dspy.clients.call_result import usage_dict
    from dspy.lm15 import Usage as LMUsage

    try:
        prompt, completion = usage.get("prompt_tokens_details") or {}, usage.get("completion_tokens_details") or {}
        read = LMUsage(
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            reasoning_tokens=completion.get("reasoning_tokens"),
            cache_read_tokens=prompt.get("cached_tokens"),
            cache_write_tokens=prompt.get("cache_write_tokens"),
            input_audio_tokens=prompt.get("audio_tokens"),
            output_audio_tokens=completion.get("audio_tokens"),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        logger.debug("the reply's usage is not counted (%s): %r", exc, usage)
        return
    tracker.add_usage(lm.model, usage_dict(SimpleNamespace(usage=read), PROVIDER))


def _record_history(lm, messages: list[dict], body: dict, reply: dict, text: str) -> None:
    """The entry DSPy's LM keeps for a call (``dspy.inspect_history``), unless history is off (commands).

    The reply is kept without its tokens' log-probabilities (the step's result has what they say): DSPy keeps
    up to 10,000 entries, and with them the reply was a few hundred objects each, which Python's garbage
    collector then walked again and again: 0.9 ms a call, more than the call itself (``bench/library_overhead.py``).
    """
    if dspy.settings.disable_history:
        return
    import datetime
    import random
    import uuid

    kept = {
        **reply,
        "choices": [
            {**choice, "logprobs": None} if isinstance(choice, dict) and choice.get("logprobs") else choice
            for choice in reply.get("choices") or []
        ],
    }
    lm.update_history(
        {
            "prompt": None,
            "messages": messages,
            "kwargs": {k: v for k, v in body.items() if k not in ("model", "messages")},
            "response": kept,
            "outputs": [text],
            "usage": reply.get("usage") or {},
            "cost": None,
            "timestamp": datetime.datetime.now().isoformat(),
            "model": lm.model,
            "uuid": str(uuid.UUID(int=random.getrandbits(128), version=4)),  # an id, not a secret: no os.urandom call
            "response_model": reply.get("model"),
            "model_type": lm.model_type,
        }
    )


async def _call(
    predict: dspy.Predict,
    adapter,
    inputs: dict[str, str],
    config: dict,
    truncated: tuple[str, ...],
    key: str,
    cache,
    backend,
) -> StepOutput:
    signature = predict.signature
    started = time.perf_counter()
    fields, raw, error, logprobs = None, "", None, None
    with track_usage() as tracker, dspy.context(adapter=adapter):
        try:
            prediction = await predict.acall(**inputs, config=config)
            fields = {name: prediction[name] for name in signature.output_fields}
            meta = prediction.get("logprobs") or {}  # JudgeAdapter puts the raw text here too
            raw = meta.get("text", "") if isinstance(meta, dict) else ""
            logprobs = choice_logprobs(meta, signature)
        except AdapterParseError as exc:
            raw = exc.lm_response or ""
            error = f"unparsed: {getattr(exc, 'reason', 'the output does not match the signature')}"
        except BACKEND_ERRORS:
            raise
        except PER_REQUEST_ERRORS as exc:
            error = refused(exc)
    entries = [entry for rows in tracker.usage_data.values() for entry in rows]
    usage = Usage(
        lm_calls=max(len(entries), 1),
        prompt_tokens=sum(e.get("prompt_tokens") or 0 for e in entries),
        completion_tokens=sum(e.get("completion_tokens") or 0 for e in entries),
        latency_s=time.perf_counter() - started,
    )
    step = StepOutput(fields=fields, raw=raw, usage=usage, error=error, logprobs=logprobs, truncated=truncated)
    keep(cache, key, backend, step)  # a model's output, parsed or not, is a result; a refusal is final here
    return step
