"""Run independent judge steps at once, each in a copy of the caller's DSPy context.

DSPy keeps the LM, adapter and usage tracker in context variables; a plain thread pool
would lose them, so every task runs in its own copy of the submitting context. The judging
itself is async (:func:`reflectagent.calling.steps.arun_step`); :func:`run_sync` is how the sync API
runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
    if (
        threading.current_thread() is thread
    ):  # sync code called from a step on the shared loop: it cannot wait on itself
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(context.run, asyncio.run, awaitable).result()
    done: concurrent.futures.Future = concurrent.futures.Future()
    started: list[asyncio.Task] = []

    def finish(task: asyncio.Task) -> None:
        if task.cancelled():
            done.cancel()
        elif task.exception() is not None:
            done.set_exception(task.exception())
        else:
            done.set_result(task.result())

    def start() -> None:
        try:
            task = loop.create_task(awaitable, context=context)
        except BaseException as exc:  # not a coroutine, say: the caller must hear of it, not wait forever
            done.set_exception(exc)
            return
        started.append(task)
        task.add_done_callback(finish)

    loop.call_soon_threadsafe(start)
    try:
        return done.result()
    except BaseException:
        if started and not done.done():  # the caller stopped waiting (Ctrl-C): so does the work
            loop.call_soon_threadsafe(started[0].cancel)
        raise


def _forget_in_child() -> None:
    """A forked child has no loop thread: it starts its own on first use."""
    global _loop
    _loop = None


os.register_at_fork(after_in_child=_forget_in_child)


def run_all(tasks: list[Callable[[], R]], max_workers: int | None = None) -> list[R]:
    """Call every task concurrently and return their results in order (first error raises)."""
    if len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=max_workers or len(tasks)) as pool:
        futures = [pool.submit(contextvars.copy_context().run, task) for task in tasks]
        return [future.result() for future in futures]
