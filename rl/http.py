"""uvicorn for the reward service on an open port: deadlines for the request head and body, so slow clients cannot
hold connections.

Why: uvicorn (0.55) arms no timer while a request arrives; its keep-alive timeout starts only after a response and
is reset by every byte. 300 connections sending a header byte now and then were held open for as long as their
senders liked (a "slowloris"), and so is one that sends its head whole and then its body a byte at a time (the
service reads the body before it judges, so such a request holds a connection, not a judging place). Here the h11
protocol follows the client's side of each request: the request line and headers must be complete within
``header_timeout_s`` of the connection opening (or of its last response, when kept alive), and the body within
``body_timeout_s`` of the head; else the connection is closed. h11 already bounds the head's size
(``h11_max_incomplete_event_size``, 16 KiB by default), and the service bounds the body's (``max_body_bytes``).
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete ``header_timeout_s`` after it
    opened (or after its last response), or whose body is not complete ``body_timeout_s`` after its head."""
    seconds = {"head": header_timeout_s, "body": body_timeout_s}

    class Deadlines(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _awaiting: str | None = None  # the part of a request the running deadline is for

        def _follow(self) -> None:
            """A deadline for the part of the request still arriving, armed once when that part starts."""
            state = self.conn.their_state
            awaiting = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            if awaiting == self._awaiting:
                return
            if self._deadline is not None:
                self._deadline.cancel()
            self._awaiting = awaiting
            self._deadline = None if awaiting is None else self.loop.call_later(seconds[awaiting], self._too_slow)

        def _too_slow(self) -> None:
            part, self._deadline, self._awaiting = self._awaiting, None, None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                logger.info("closing a connection whose request %s took over %g s", part, seconds[part])
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._follow()

        def handle_events(self) -> None:
            super().handle_events()
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._follow()  # a kept-alive connection's next head has the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._awaiting = None
            super().connection_lost(exc)

    return Deadlines


def service_config(
    app, *, host: str, port: int, header_timeout_s: float, body_timeout_s: float = 60, log_level: str = "warning"
) -> uvicorn.Config:
    """The uvicorn config the reward service runs under (and its tests): h11 with deadlines for heads and bodies."""
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=deadline_protocol(header_timeout_s, body_timeout_s)
    )
