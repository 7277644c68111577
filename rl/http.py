"""uvicorn for the reward service on an open port: a deadline for the request head, so slow clients cannot hold connections.

Why: uvicorn (0.55) arms no timer while a request's headers arrive; its keep-alive timeout starts only after a
response and is reset by every byte. 300 connections sending a header byte now and then were held open for as
long as their senders liked (a "slowloris"). Here the h11 protocol gets a deadline from the moment a connection
opens (and again when a kept-alive connection is done with a response): the request line and headers must be
complete within ``header_timeout_s``, else the connection is closed. h11 already bounds the head's size
(``h11_max_incomplete_event_size``, 16 KiB by default), and the service bounds the body (``max_body_bytes``).
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def header_deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete ``header_timeout_s`` after
    it opened (or after its last response)."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no complete head
                logger.info("closing a connection whose request head took over %g s", header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head is in: the body and the work have their own bounds
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # a kept-alive connection's next head has the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def service_config(app, *, host: str, port: int, header_timeout_s: float, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn config the reward service runs under (and its tests): h11 with a deadline for request heads."""
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=header_deadline_protocol(header_timeout_s)
    )
