"""One call for all who need the same step at once: the tasks and threads of a process wait on the maker's
future, processes sharing a cache on a lease in it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable

from reflectagent.records.results import StepOutput

_inflight: dict[str, concurrent.futures.Future] = {}  # key -> done when its maker finishes (any thread, any loop)
_inflight_guard = threading.Lock()


def _forget_in_child() -> None:
    """A forked child makes its own steps: its parent's makers will never finish there."""
    global _inflight_guard
    _inflight.clear()
    _inflight_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


LEASE_POLL_S = 0.1


async def single_flight(key: str, cache, cached: Callable[[], StepOutput | None], make, reused) -> StepOutput:
    """The cached step (or its cached refusal), else one ``make()`` for all who need it: concurrent
    identical steps (both presentations of a pair, two programs sharing stage 1, several processes on
    one cache folder) wait for one call instead of each making it. Tasks and threads of a process wait
    on the maker's future; processes on a :class:`reflectagent.calling.cache.Lease` in the cache, whose holder
    dies with it. A maker that fails leaves nothing cached: a waiter then tries itself. ``cached()`` is what the
    cache holds for the step (its result or its refusal), None while it holds nothing."""
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
