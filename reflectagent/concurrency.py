"""Run independent judge steps at once, each in a copy of the caller's DSPy context.

DSPy keeps the LM, adapter and usage tracker in context variables; a plain thread pool
would lose them, so every task runs in its own copy of the submitting context. The judging
itself is async (:func:`reflectagent.steps.arun_step`); :func:`run_sync` is how the sync API
runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Awaitable
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


_loop: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
IO_THREADS = 64
_loop_guard = threading.Lock()


def _shared_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """One event loop for every sync caller of the process, on a daemon thread: LM clients keep one
    connection pool per loop (DSPy's async engines do), so a loop per call would open a pool per call."""
    global _loop
    with _loop_guard:
        if _loop is None or not _loop[1].is_alive():  # first use, or a forked child (the thread is gone)
            loop = asyncio.new_event_loop()
            # cache I/O runs in the loop's executor (``asyncio.to_thread``): room for every step in flight
            loop.set_default_executor(ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="reflectagent-io"))
            thread = threading.Thread(target=loop.run_forever, name="reflectagent-loop", daemon=True)
            thread.start()
            _loop = (loop, thread)
        return _loop


def run_sync(awaitable: Awaitable[R]) -> R:
    """Run a coroutine to its end from sync code, in the caller's context (DSPy's LM, the cache), on the
    process's shared event loop; many threads may call at once, and their work interleaves there."""
    loop, thread = _shared_loop()
    context = contextvars.copy_context()
    if threading.current_thread() is thread:  # sync code called from a step on the shared loop: it cannot wait on itself
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(context.run, asyncio.run, awaitable).result()
    done: concurrent.futures.Future = concurrent.futures.Future()

    def start() -> None:
        task = loop.create_task(awaitable, context=context)
        task.add_done_callback(lambda t: done.cancel() if t.cancelled() else
                               done.set_exception(t.exception()) if t.exception() is not None else done.set_result(t.result()))

    loop.call_soon_threadsafe(start)
    return done.result()


def run_all(tasks: list[Callable[[], R]], max_workers: int | None = None) -> list[R]:
    """Call every task concurrently and return their results in order (first error raises)."""
    if len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=max_workers or len(tasks)) as pool:
        futures = [pool.submit(contextvars.copy_context().run, task) for task in tasks]
        return [future.result() for future in futures]


def map_unordered(fn: Callable[[T], R], items: Iterable[T], max_workers: int) -> Iterator[tuple[T, R | BaseException]]:
    """Yield ``(item, result or exception)`` as each finishes, so a caller can save progress.

    Closing the generator early (a caller that stops on a dead backend) cancels the tasks
    not yet started instead of running them all.
    """
    pool = ThreadPoolExecutor(max_workers=max_workers)
    try:
        futures = {pool.submit(contextvars.copy_context().run, fn, item): item for item in items}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], (error if error is not None else future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
