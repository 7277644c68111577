"""Run independent judge steps at once, each in a copy of the caller's DSPy context.

DSPy keeps the LM, adapter and usage tracker in context variables; a plain thread pool
would lose them, so every task runs in its own copy of the submitting context.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
