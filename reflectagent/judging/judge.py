"""What every judge shares, and the simplest judge worth running.

``Judge`` validates the pair, answers identical responses without asking a model, times
the call and collects notes; subclasses only decide, async first (``adecide``: its steps run
at once on one event loop) or sync (``decide``: run in a thread when judged from async code). ``PositionSwapJudge`` is the smallest
judge that is honest about position bias: one analysis in each order, a verdict only when
the two agree.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sized
from typing import Literal

import dspy
from tqdm.auto import tqdm

from reflectagent import __version__
from reflectagent.calling.cache import caching
from reflectagent.calling.concurrency import run_sync
from reflectagent.errors import ReflectAgentError
from reflectagent.judging.modules import Analyzer
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment
from reflectagent.serving.server import ServerError


class ProgramFileError(ReflectAgentError, ValueError):
    """A saved program that is not the program (or version) being loaded."""


class Judge(dspy.Module):
    """Base class: ``forward(prompt, response_a, response_b) -> Judgment``.

    Subclasses pass their constructor options to ``super().__init__(**options)`` so that a
    saved program can be rebuilt exactly; bump ``version`` when a program's structure (its
    predictors or how it decides) changes, so old files are refused instead of misread.
    """

    version = 1

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, prompt: str, response_a: str, response_b: str, **_) -> Judgment:
        return self.judge(Pair(prompt=prompt, response_a=response_a, response_b=response_b))

    async def aforward(self, prompt: str, response_a: str, response_b: str, **_) -> Judgment:
        return await self.ajudge(Pair(prompt=prompt, response_a=response_a, response_b=response_b))

    def judge(self, pair: Pair) -> Judgment:
        started = time.perf_counter()
        if pair.identical:
            return self._finish(pair, self._identical(), started)
        return self._finish(pair, self.decide(pair) if self._decides_sync() else run_sync(self.adecide(pair)), started)

    async def ajudge(self, pair: Pair) -> Judgment:
        started = time.perf_counter()
        if pair.identical:
            return self._finish(pair, self._identical(), started)
        return self._finish(pair, await (_in_thread(self.decide, pair) if self._decides_sync() else self.adecide(pair)), started)

    def _decides_sync(self) -> bool:
        """Whether this judge's most derived decision is ``decide`` (sync) rather than ``adecide``: a subclass
        that overrides either is judged by its override, on the sync and the async path alike."""
        for cls in type(self).__mro__:
            if cls is Judge:
                raise NotImplementedError(f"{type(self).__name__} defines neither decide nor adecide")
            if "adecide" in vars(cls):
                return False
            if "decide" in vars(cls):
                return True
        raise NotImplementedError(type(self).__name__)

    @staticmethod
    def _identical() -> Judgment:
        return Judgment(preference=None, reason="identical responses: there is nothing to prefer")

    def _finish(self, pair: Pair, judgment: Judgment, started: float) -> Judgment:
        notes = list(judgment.notes)
        for name in ("response_a", "response_b"):
            if not getattr(pair, name).strip():
                notes.append(f"{name} is empty")
        cut = sorted({field for step in judgment.steps for field in step.truncated})
        if cut:
            notes.append(f"truncated to fit the context: {', '.join(cut)}")
        return replace(judgment, latency_s=time.perf_counter() - started, notes=tuple(notes),
                       program=type(self).__name__)

    def decide(self, pair: Pair) -> Judgment:
        """The verdict for a pair (never identical responses). A program that defines ``adecide`` gets this."""
        return run_sync(self.adecide(pair))

    async def adecide(self, pair: Pair) -> Judgment:
        """The verdict, async. A judge that defines only ``decide`` (sync) is run in a thread."""
        return await _in_thread(self.decide, pair)

    def save(self, path: str | Path) -> Path:
        """Write the program's identity, options and compiled state (demos, instructions) as JSON."""
        payload = {
            "reflectagent": {"program": type(self).__name__, "version": self.version, "library": __version__},
            "options": self.options,
            # Backends are configuration, not part of a program: predictor LMs are not saved.
            "state": {name: {**state, "lm": None} for name, state in self.dump_state().items()},
        }
        path = Path(path)
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        """Rebuild a program saved by :meth:`save`; another program or version is an error."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            meta = payload["reflectagent"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProgramFileError(f"{path} is not a saved reflectagent program: {exc}") from exc
        if meta.get("program") != cls.__name__:
            raise ProgramFileError(f"{path} holds a {meta.get('program')} program, not {cls.__name__}")
        if meta.get("version") != cls.version:
            raise ProgramFileError(
                f"{path} was saved by {cls.__name__} version {meta.get('version')}; this is version {cls.version}"
            )
        program = cls(**payload.get("options", {}))
        lms = [(predictor, predictor.lm) for predictor in program.predictors()]
        program.load_state(payload["state"])
        for predictor, lm in lms:  # keep the LMs the constructor chose (e.g. ensemble members' backends)
            predictor.lm = lm
        return program


Decision = Literal["vote", "probability"]


_sync_judges = ThreadPoolExecutor(max_workers=256, thread_name_prefix="reflectagent-sync-judge")


async def _in_thread(decide, pair: Pair) -> Judgment:
    """A sync ``decide`` from async code, in the caller's context, on threads of its own: it may wait on
    steps that need the event loop's executor, so it must never hold one of that executor's threads."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_sync_judges, context.run, decide, pair)


def check_decision(decision: str) -> None:
    if decision not in ("vote", "probability"):
        raise ValueError(f"decision must be 'vote' or 'probability', not {decision!r}")


class PositionSwapJudge(Judge):
    """One analysis in each order. ``decision="vote"``: the verdict when both parse and agree, none
    otherwise; ``"probability"``: the order-averaged P(A) from the verdict tokens decides."""

    def __init__(self, decision: Decision = "vote"):
        check_decision(decision)
        super().__init__(decision=decision)
        self.decision = decision
        self.analyzer = Analyzer()

    async def adecide(self, pair: Pair) -> Judgment:
        analyses = tuple(await asyncio.gather(self.analyzer.acall(pair, swapped=False), self.analyzer.acall(pair, swapped=True)))
        probability_a = order_averaged_probability(analyses)
        if self.decision == "probability":
            preference, reason = probability_verdict(probability_a)
            return Judgment(preference=preference, analyses=analyses, reason=reason, probability_a=probability_a)
        if not all(a.parsed for a in analyses):
            return Judgment(preference=None, analyses=analyses, reason="unparsed")
        if len({a.preference for a in analyses}) > 1:
            return Judgment(preference=None, analyses=analyses, reason="inconsistent across orders",
                            probability_a=probability_a)
        return Judgment(preference=analyses[0].preference, analyses=analyses, probability_a=probability_a)


def probability_verdict(probability_a: float | None) -> tuple[str | None, str | None]:
    """A if P(A) > 0.5, B if below; no verdict at exactly 0.5 or without probabilities (never a guess)."""
    if probability_a is None:
        return None, "no verdict probabilities"
    if probability_a == 0.5:
        return None, "tied probability"
    return ("A" if probability_a > 0.5 else "B"), None


def order_averaged_probability(analyses) -> float | None:
    """P(A better) averaged over the analyses (and so over both orders); None if any lacks it."""
    probs = [a.probability if a.preference == "A" else 1 - a.probability
             for a in analyses if a.parsed and a.probability is not None]
    return sum(probs) / len(probs) if probs and len(probs) == len(analyses) else None


def is_transient(error: BaseException) -> bool:
    """Whether the same call may succeed later: the backend was away, slow or busy, or its reply came
    broken (HTTP 200 with a body that is not the answer: a proxy's or a dying server's fault), not the
    input wrong. DSPy does not retry a broken reply itself (the request may have been served)."""
    import httpx
    from dspy.utils.exceptions import LMProviderError, LMRateLimitError, LMServerError, LMTimeoutError, LMTransportError

    broken_reply = isinstance(error, LMProviderError) and error.status is not None and 200 <= error.status < 300
    return broken_reply or isinstance(error, (LMTransportError, LMTimeoutError, LMServerError, LMRateLimitError, ServerError,
                                              httpx.TransportError, ConnectionError, TimeoutError))


def _timed_out(error: BaseException) -> bool:
    """Whether a client timeout is behind ``error`` (DSPy wraps its transport's ``ReadTimeout`` in an
    ``LMTransportError``), found along the chain of causes."""
    import httpx
    from dspy.utils.exceptions import LMTimeoutError

    seen: BaseException | None = error
    for _ in range(16):  # a chain is short; a cycle is not followed for ever
        if seen is None:
            return False
        if isinstance(seen, (TimeoutError, LMTimeoutError, httpx.TimeoutException)) or type(seen).__name__.endswith("Timeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _timeout_text() -> str:
    """What timed out, in the config's own terms: the backend in force and its ``timeout_s`` and ``num_retries``
    (the knobs a user has), not the transport's internals."""
    backend = getattr(dspy.settings.lm, "backend", None)
    config = getattr(backend, "config", None)
    if config is None:
        return "timed out: the backend gave no answer within its timeout_s; raise timeout_s in its table of the config if the model needs longer, or check the server"
    tries = config.num_retries + 1
    return (f"timed out: backend {backend.name!r} gave no answer within timeout_s = {config.timeout_s:g} s "
            f"({tries} tr{'y' if tries == 1 else 'ies'}: num_retries = {config.num_retries}); if the model needs longer, "
            f"raise timeout_s in [backends.{backend.name}] of the config, else check the server")


class RunInterrupted(ReflectAgentError, RuntimeError):
    """Judging stopped. A dead or slow backend: a re-run resumes from the cache (or, with the cache off, starts
    over: the message never promises what was not kept). Anything else would fail again the same way: the
    message says to fix it first. A timeout is told in the config's terms (``timeout_s``)."""

    def __init__(self, done: int, total: int, cause: BaseException, cached: bool | None = None):
        cached = caching() if cached is None else cached
        if not cached:
            advice = ("The judgment cache is off, so no finished step was kept: the same command again starts from the "
                      "first pair" + (" (leave out --no-cache to keep steps for a resume)." if is_transient(cause) else
                                      ", and stops here again unless the cause above is fixed."))
        elif is_transient(cause):
            advice = "Every finished step is in the judgment cache: run the same command again to resume."
        else:
            advice = ("This is not a backend that went away: the same command would stop here again. Fix the cause above "
                      "(the input, the config or a bug to report); every finished step is in the judgment cache.")
        what = _timeout_text() if _timed_out(cause) else str(cause)
        super().__init__(f"stopped after {done} of {total} judgments: {type(cause).__name__}: {what}\n{advice}")
        self.done, self.total, self.cause = done, total, cause


def judge_pairs(judge: Judge, pairs: list[Pair], *, concurrency: int = 8, progress: bool = True) -> list[Judgment]:
    """Judge many pairs concurrently, in input order, with a progress bar (:func:`ajudge_pairs`, run).

    A run keeps no DSPy trace, even inside ``dspy.context(trace=[])``: to collect demos, call the program
    itself, as DSPy's optimisers do."""
    return run_sync(ajudge_pairs(judge, pairs, concurrency=concurrency, progress=progress))


async def ajudge_pairs(judge: Judge, pairs: list[Pair], *, concurrency: int = 8, progress: bool = True) -> list[Judgment]:
    """Judge many pairs on one event loop, ``concurrency`` at a time, in input order."""
    jobs = [(lambda p=pair: judge.ajudge(p)) for pair in pairs]
    return await judge_all(jobs, concurrency=concurrency, progress=progress, desc=type(judge).__name__, unit="pair")


def _untraced():
    """No DSPy trace inside a run: its judgments are its record, and a trace of every call (for optimisers,
    which open their own) costs CPU and holds up to ``max_trace_size`` calls' inputs in memory."""
    return dspy.context(trace=None)


async def judge_in_order(judge: Judge, pairs: Iterable[Pair], *, concurrency: int = 8,
                         window: int | None = None) -> AsyncIterator[tuple[Pair, Judgment]]:
    """Yield ``(pair, judgment)`` in input order as soon as each is ready, ``concurrency`` judging at once and
    at most ``window`` (default 4x that) started or waiting to be yielded: a run of any length holds only
    the window, so its memory stays flat. The first error stops the rest (:class:`RunInterrupted`)."""
    gate, window = asyncio.Semaphore(concurrency), window or 4 * concurrency
    total = len(pairs) if isinstance(pairs, Sized) else None
    started: deque[tuple[Pair, asyncio.Task]] = deque()
    remaining, done = iter(pairs), 0

    async def one(pair: Pair) -> Judgment:
        async with gate:
            with _untraced():
                return await judge.ajudge(pair)

    try:
        while True:
            while len(started) < window and (pair := next(remaining, None)) is not None:
                started.append((pair, asyncio.ensure_future(one(pair))))
            if not started:
                return
            pair, task = started.popleft()
            try:
                judgment = await task
            except Exception as exc:
                raise RunInterrupted(done, total if total is not None else done + 1 + len(started), exc) from exc
            done += 1
            yield pair, judgment
    finally:
        for _, task in started:
            task.cancel()
        await asyncio.gather(*(task for _, task in started), return_exceptions=True)


async def judge_all(jobs: list[Callable[[], Awaitable[Judgment]]], *, concurrency: int, progress: bool, desc: str,
                    unit: str = "judgment") -> list[Judgment]:
    """Run judgment jobs ``concurrency`` at a time, results in job order, with a progress bar. The first
    error stops them all (:class:`RunInterrupted`): unfinished jobs are cancelled, finished steps are cached."""
    results: list[Judgment | None] = [None] * len(jobs)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            with _untraced():
                results[index] = await jobs[index]()

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(jobs))]
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        try:
            for finished in asyncio.as_completed(tasks):
                try:
                    await finished
                except Exception as exc:
                    raise RunInterrupted(sum(r is not None for r in results), len(jobs), exc) from exc
                bar.update()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return results  # type: ignore[return-value]