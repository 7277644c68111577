"""What a failed request means for the run, and what is kept of it (the error policy of a step).

Errors that belong to one request (its size or content), not to the backend: the step fails, the run goes on, and
the failure is cached (the same request would be refused again), beside the step's key with the context it was
refused in, so a server given a longer context tries it again. Anything else (a dead server, a timeout, a model
name the endpoint does not serve) propagates uncached, so a re-run retries it and nothing is lost. A model's output,
parsed or not, is a result, cached under the step's own key.
"""

from __future__ import annotations

import logging

from dspy.utils.exceptions import ContextWindowExceededError, LMInvalidRequestError, LMUnsupportedModelError

from reflectagent.calling.cache import step_key
from reflectagent.records.results import StepOutput

logger = logging.getLogger(__name__)

PER_REQUEST_ERRORS = (ContextWindowExceededError, LMInvalidRequestError)
BACKEND_ERRORS = (LMUnsupportedModelError,)  # invalid-request errors that are the endpoint's, not the request's


def refusal_key(key: str, backend) -> str:
    """Where a request the server refused is cached: beside its key, with the context it was refused in,
    so a server given a longer context tries it again."""
    return step_key(refused=key, context=getattr(backend, "context_tokens", None))


def refused(exc: BaseException) -> str:
    """The step's error for a request the server refused (one of :data:`PER_REQUEST_ERRORS`), told in the log."""
    error = f"{type(exc).__name__}: {exc}"
    logger.warning("the server refused a request; the step fails (cached, not retried): %s", error)
    return error


def keep(cache, key: str, backend, step: StepOutput) -> None:
    """Cache a step that was answered: a refusal under its refusal key, anything else (an output, parsed or not)
    under its own."""
    is_refusal = step.error is not None and not step.error.startswith("unparsed")
    cache.put(refusal_key(key, backend) if is_refusal else key, step)


def cached_step(cache, key: str, refused_key: str) -> StepOutput | None:
    """What the cache holds for a step: its result, else its refusal (one for this context), else None."""
    refusal = cache.get(refused_key)
    if refusal is not None and (refusal.error or "").startswith("LMUnsupportedModelError"):
        refusal = None  # cached by versions before a22440b: the endpoint's fault, not this request's
    return cache.get(key) or refusal
