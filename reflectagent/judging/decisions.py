"""How a program turns its analyses into a verdict: by vote, or by the order-averaged probability of A, never a
guess where neither says; and what a probability decision needs of its LM (the verdict token's log-probabilities),
checked before its first call and after each judgment, so an LM without them stops the run with what to do instead
of giving no verdict for every pair."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

from reflectagent.errors import ConfigError

Decision = Literal["vote", "probability"]

logger = logging.getLogger(__name__)
_told: set[str] = set()  # plain LMs already warned about (by model name), once per process

VOTE_PROGRAMS = "a vote program such as genrm (or genrm-both, reflectrm, pointwise)"


class LogprobsUnavailable(ConfigError):
    """A program that decides by probability, on an LM that gives no log-probabilities for the verdict token: every
    pair would get no verdict. Raised before any call where the backend in force does not ask for them
    (``logprobs`` off), and after a judgment where a parsed verdict came back without them (a server that ignores
    the request). A configuration to fix, not a pair's failure: a batch run stops on it."""


def check_decision(decision: str) -> None:
    if decision not in ("vote", "probability"):
        raise ValueError(f"decision must be 'vote' or 'probability', not {decision!r}")


def probability_verdict(probability_a: float | None) -> tuple[str | None, str | None]:
    """A if P(A) > 0.5, B if below; no verdict at exactly 0.5 or without probabilities (never a guess)."""
    if probability_a is None:
        return None, "no verdict probabilities"
    if probability_a == 0.5:
        return None, "tied probability"
    return ("A" if probability_a > 0.5 else "B"), None


def order_averaged_probability(analyses) -> float | None:
    """P(A better) averaged over the analyses (and so over both orders); None if any lacks it."""
    probs = [
        a.probability if a.preference == "A" else 1 - a.probability
        for a in analyses
        if a.parsed and a.probability is not None
    ]
    return sum(probs) / len(probs) if probs and len(probs) == len(analyses) else None


def asks_logprobs(lm: Any) -> bool:
    """Whether a step on ``lm`` asks for log-probabilities: a configured backend's ``logprobs`` (what
    :func:`reflectagent.calling.steps.arun_step` sends), else the LM's own ``logprobs`` option (a plain ``dspy.LM``
    created with ``logprobs=True``)."""
    backend = getattr(lm, "backend", None)
    if backend is not None:
        return bool(backend.logprobs)
    return bool((getattr(lm, "kwargs", None) or {}).get("logprobs"))


def require_logprobs(program: str, lms: Iterable[Any]) -> None:
    """Before any call: raise :class:`LogprobsUnavailable` where a configured backend among ``lms`` (the LMs a
    probability program's steps will run on) does not ask for log-probabilities. A plain DSPy LM that is not asked
    for them is told of once in the log, not refused: it is not reflectagent's to configure, and it may be a test's
    fake; a parsed verdict it returns without them is then no verdict, as the judgment says."""
    for lm in lms:
        backend = getattr(lm, "backend", None)
        if backend is not None:
            if not backend.logprobs:
                raise LogprobsUnavailable(_off(program, backend))
        elif not asks_logprobs(lm):
            model = str(getattr(lm, "model", type(lm).__name__))
            if model not in _told:
                _told.add(model)
                logger.warning(
                    "%s decides by the verdict token's log-probabilities, but the LM %r is not a reflectagent backend "
                    "and is not asked for them: without them it gives no verdict. Judge under reflectagent.backend(NAME) "
                    "with logprobs on, create the LM with logprobs=True, top_logprobs=5 (if its server returns them), "
                    "or use %s.",
                    program,
                    model,
                    VOTE_PROGRAMS,
                )


def _off(program: str, backend: Any) -> str:
    config = getattr(backend, "config", None)
    why = (
        f"logprobs = false in [backends.{backend.name}]"
        if getattr(config, "logprobs", None) is False
        else "logprobs is off by default for a backend that is not vLLM"
    )
    return (
        f"{program} decides by the verdict token's log-probabilities, but backend {backend.name!r} does not ask for "
        f"them ({why}): on it every pair would get no verdict. If its server returns log-probs, set logprobs = true "
        f"in [backends.{backend.name}]; otherwise judge with {VOTE_PROGRAMS}."
    )


def require_verdict_logprobs(program: str, steps: Iterable[Any], lms: Iterable[Any]) -> None:
    """After a judgment: raise :class:`LogprobsUnavailable` where a parsed verdict (an analysis, or a rating) came
    back without its probability from an LM asked for log-probabilities: the server ignored the request, and would
    for every pair. An unparsed or failed step is not one (its judgment already says no verdict), nor is a step of
    an LM never asked (:func:`require_logprobs` told of it). A step from the judgment cache counts like a live one:
    its key holds the request for log-probs, so it is what the server answered to it, and a re-run reads it again."""
    bare = [step for step in steps if step.parsed and step.error is None and _probability(step) is None]
    if not bare:
        return
    asked = next((lm for lm in lms if asks_logprobs(lm)), None)
    if asked is None:
        return
    backend = getattr(asked, "backend", None)
    if backend is not None:
        who, fix = (
            f"backend {backend.name!r} was asked for log-probabilities, but its server",
            f"judge with {VOTE_PROGRAMS} on this backend (and set logprobs = false in [backends.{backend.name}]), or "
            "serve the model with an engine that returns log-probs",
        )
        again = f"--no-cache or another cache_tag in [backends.{backend.name}]"
    else:
        who, fix = (
            f"the LM {getattr(asked, 'model', type(asked).__name__)!r} was asked for log-probabilities "
            "(logprobs=True), but it",
            f"judge with {VOTE_PROGRAMS}, or use an LM whose server returns log-probs",
        )
        again = "--no-cache"
    cached = ""
    if all(step.cached for step in bare):
        cached = (
            " (this verdict came from the judgment cache, kept as it was first answered: once the server sends "
            f"log-probs, judge again with {again}, or the same reply is read again)"
        )
    raise LogprobsUnavailable(
        f"{who} returned a parsed verdict with no log-probabilities for its verdict token{cached}: it ignores the "
        f"request (some engines do), so {program}, which decides by that token's probability, would give no verdict "
        f"for any pair. Instead, {fix}."
    )


def _probability(step: Any) -> float | None:
    """What a step gives a probability decision: an analysis's P(its verdict), a rating's expected rating."""
    return step.score if hasattr(step, "score") else step.probability
