"""Many pairs judged on one event loop: concurrently, in input order (all at once, or yielded as they are ready in
a bounded window), the first error stopping the run with what a re-run can and cannot resume
(:class:`RunInterrupted`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sized

import dspy
from tqdm.auto import tqdm

from reflectagent.calling.cache import caching
from reflectagent.calling.concurrency import run_sync
from reflectagent.errors import ReflectAgentError
from reflectagent.judging.base import Judge
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment
from reflectagent.serving.server import ServerError


def is_transient(error: BaseException) -> bool:
    """Whether the same call may succeed later: the backend was away, slow or busy, or its reply came
    broken (HTTP 200 with a body that is not the answer: a proxy's or a dying server's fault), not the
    input wrong. DSPy does not retry a broken reply itself (the request may have been served)."""
    import httpx
    from dspy.utils.exceptions import LMProviderError, LMRateLimitError, LMServerError, LMTimeoutError, LMTransportError

    broken_reply = isinstance(error, LMProviderError) and error.status is not None and 200 <= error.status < 300
    return broken_reply or isinstance(
        error,
        (
            LMTransportError,
            LMTimeoutError,
            LMServerError,
            LMRateLimitError,
            ServerError,
            httpx.TransportError,
            ConnectionError,
            TimeoutError,
        ),
    )


def _timed_out(error: BaseException) -> bool:
    """Whether a client timeout is behind ``error`` (DSPy wraps its transport's ``ReadTimeout`` in an
    ``LMTransportError``), found along the chain of causes."""
    import httpx
    from dspy.utils.exceptions import LMTimeoutError

    seen: BaseException | None = error
    for _ in range(16):  # a chain is short; a cycle is not followed for ever
        if seen is None:
            return False
        if isinstance(seen, (TimeoutError, LMTimeoutError, httpx.TimeoutException)) or type(seen).__name__.endswith(
            "Timeout"
        ):
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
    return (
        f"timed out: backend {backend.name!r} gave no answer within timeout_s = {config.timeout_s:g} s "
        f"({tries} tr{'y' if tries == 1 else 'ies'}: num_retries = {config.num_retries}); if the model needs longer, "
        f"raise timeout_s in [backends.{backend.name}] of the config, else check the server"
    )


class RunInterrupted(ReflectAgentError, RuntimeError):
    """Judging stopped. A dead or slow backend: a re-run resumes from the cache (or, with the cache off, starts
    over: the message never promises what was not kept). Anything else would fail again the same way: the
    message says to fix it first. A timeout is told in the config's terms (``timeout_s``)."""

    def __init__(self, done: int, total: int, cause: BaseException, cached: bool | None = None):
        cached = caching() if cached is None else cached
        if not cached:
            advice = (
                "The judgment cache is off, so no finished step was kept: the same command again starts from the "
                "first pair"
                + (
                    " (leave out --no-cache to keep steps for a resume)."
                    if is_transient(cause)
                    else ", and stops here again unless the cause above is fixed."
                )
            )
        elif is_transient(cause):
            advice = "Every finished step is in the judgment cache: run the same command again to resume."
        else:
            advice = (
                "This is not a backend that went away: the same command would stop here again. Fix the cause above "
                "(the input, the config or a bug to report); every finished step is in the judgment cache."
            )
        what = _timeout_text() if _timed_out(cause) else str(cause)
        super().__init__(f"stopped after {done} of {total} judgments: {type(cause).__name__}: {what}\n{advice}")
        self.done, self.total, self.cause = done, total, cause


def judge_pairs(judge: Judge, pairs: list[Pair], *, concurrency: int = 8, progress: bool = True) -> list[Judgment]:
    """Judge many pairs concurrently, in input order, with a progress bar (:func:`ajudge_pairs`, run).

    A run keeps no DSPy trace, even inside ``dspy.context(trace=[])``: to collect demos, call the program
    itself, as DSPy's optimisers do."""
    return run_sync(ajudge_pairs(judge, pairs, concurrency=concurrency, progress=progress))


async def ajudge_pairs(
    judge: Judge, pairs: list[Pair], *, concurrency: int = 8, progress: bool = True
) -> list[Judgment]:
    """Judge many pairs on one event loop, ``concurrency`` at a time, in input order."""
    jobs = [(lambda p=pair: judge.ajudge(p)) for pair in pairs]
    return await judge_all(jobs, concurrency=concurrency, progress=progress, desc=type(judge).__name__, unit="pair")


def _untraced():
    """No DSPy trace inside a run: its judgments are its record, and a trace of every call (for optimisers,
    which open their own) costs CPU and holds up to ``max_trace_size`` calls' inputs in memory."""
    return dspy.context(trace=None)


async def judge_in_order(
    judge: Judge, pairs: Iterable[Pair], *, concurrency: int = 8, window: int | None = None
) -> AsyncIterator[tuple[Pair, Judgment]]:
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


async def judge_all(
    jobs: list[Callable[[], Awaitable[Judgment]]],
    *,
    concurrency: int,
    progress: bool,
    desc: str,
    unit: str = "judgment",
) -> list[Judgment]:
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
