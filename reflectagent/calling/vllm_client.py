"""The step path's own client for vLLM servers: one ``POST /chat/completions`` over a kept connection pool.

DSPy's transport turns every reply into its typed response and then back into OpenAI's shape, validating
and copying each token's log-probabilities twice, and hands each call to a thread to prepare it. On the
path vLLM backends take (constrained output, log-probs on) that cost about twice the CPU of the request
itself (``bench/library_overhead.py``). This client sends the request body DSPy would send and reads the
reply as JSON, nothing more, over aiohttp: the cheapest of the kept HTTP clients per request (httpx alone
costs more CPU per call than this whole path; measured in that bench).

What a caller can see stays DSPy's: the errors are DSPy's LM error classes, a failed reply classified by
DSPy's own reading of vLLM's error bodies (``dspy.lm15.OpenAIChatLM.normalize_error``: an unknown model,
a context overflow, a server error); ``num_retries`` further tries on DSPy's backoff (1, 2, 4 s...; a
``Retry-After`` wins) for what DSPy retries (transport faults, timeouts, 429 and 5xx), and a reply that
arrived is never sent again; ``timeout_s`` bounds each try's wait for the connection and for the reply;
the config's ``headers`` and ``extra_headers`` go with every request; a proxy named in the environment is
used as httpx uses it (``all_proxy`` too; read once per endpoint), never for a server on this machine
(:mod:`reflectagent.serving.loopback`, which reflectagent's httpx requests follow too).

Connections are pooled per event loop (an aiohttp session belongs to one loop). A loop that ends through
``asyncio.run`` (or ``shutdown_asyncgens``) closes its session as it ends; the shared loop of
:mod:`reflectagent.calling.concurrency` closes its at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import email.utils
import functools
import json
import logging
import math
import os
import threading
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import Mapping
from typing import Any

from reflectagent.errors import ConfigError
from reflectagent.serving.loopback import bypasses_proxy
from reflectagent.serving.tokens import RouteMissing, missing_route, tokenize_url

PROVIDER = "vllm"  # DSPy's name for a hosted_vllm endpoint (its errors say so)
# How long an idle connection is kept for the next request. vLLM's server (uvicorn) closes one idle for 5 s
# (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); aiohttp's default, 15 s, sent requests on connections the server was closing,
# which then failed. Below the server's, this side lets a connection go first (aiohttp checks the age at each
# take from the pool, and starts its clock after the reply, later than the server starts its).
KEEPALIVE_S = 4.0

logger = logging.getLogger(__name__)


class ChatClient:
    """Chat completions from one vLLM backend (any replica-free endpoint that speaks OpenAI's chat API)."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None,
        timeout_s: float,
        num_retries: int,
        headers: Mapping[str, Any] | None = None,
    ):
        from multidict import CIMultiDict

        self.model = model  # the LM's model string, as DSPy's errors name it ("hosted_vllm/...")
        self.timeout_s, self.num_retries = timeout_s, num_retries
        # the config's headers on every request, as DSPy's transport sends them (theirs win over the User-Agent,
        # names compared without case); the body's type and the key stay this client's (the config refuses a
        # credential in them)
        self.headers = CIMultiDict({"User-Agent": "reflectagent"})
        self.headers.update({str(k): str(v) for k, v in (headers or {}).items() if v is not None})
        self.headers["Content-Type"] = "application/json"
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._reader = None

    async def complete(self, api_base: str, body: dict[str, Any]) -> dict[str, Any]:
        """The reply to ``body`` (OpenAI's chat completion, as JSON); DSPy's LM errors otherwise."""
        try:
            data = json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:  # a lone surrogate: no server can be sent it (DSPy says the same)
            raise ValueError(
                f"the request contains text that is not valid Unicode ({exc.reason}), which no provider "
                "can receive; repair the text first"
            ) from None
        url = f"{api_base.rstrip('/')}/chat/completions"
        proxy = _env_proxy(url)
        for attempt in range(self.num_retries + 1):
            try:
                return await self._once(url, data, proxy)
            except (OSError, asyncio.TimeoutError, _aiohttp().ClientError, _lm15().LM15Error) as exc:
                error = self._dspy_error(self._canonical(exc))
                if attempt >= self.num_retries or getattr(exc, "replied", False) or not _retryable(error):
                    raise error from exc
                await asyncio.sleep(_delay(error, attempt))
        raise AssertionError("unreachable")

    async def count_tokens(self, api_base: str, model: str, messages: list[dict]) -> int:
        """The prompt's tokens as the server counts them (vLLM's ``POST /tokenize``, the chat template applied),
        as :func:`reflectagent.serving.tokens.server_counter` asks: one try, an error raised as it comes;
        :class:`reflectagent.serving.tokens.RouteMissing` where the server has no such route (not vLLM, or a proxy)."""
        url = tokenize_url(api_base)
        data = json.dumps(
            {"model": model, "messages": messages, "add_generation_prompt": True}, ensure_ascii=False
        ).encode()
        status, headers, body = await self._post(url, data, _env_proxy(url))
        missing = missing_route("POST /tokenize", url, status)
        if missing is not None:
            raise missing
        if status >= 400:
            raise self._http_error(status, body, headers)
        try:
            return int(_loads(body)["count"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            kind = headers.get("content-type") or "no content-type"
            raise RouteMissing(
                "POST /tokenize", url, f"HTTP {status}, {kind}: not vLLM's reply ({type(exc).__name__})"
            ) from None

    async def _post(self, url: str, data: bytes, proxy: str | None) -> tuple[int, Any, bytes]:
        """One request's reply: its status, headers and body.

        A request that fails on a kept connection before any reply came is sent once more at once, and counts as
        no try: the usual cause is a server that closed the connection as it idled (uvicorn after 5 s) while this
        side sent, or before a loop that was not running could see it, and such a request was never read. httpx
        (DSPy's transport) looks at the socket before it reuses one; aiohttp only hears of a close from its loop,
        and sends again by itself only methods that may be repeated (RFC 9112, 9.3.1), never a POST.

        It is sent again on a new connection, made for it and closed after it: the pool's next one may be just as
        stale (the server's idle timer lets every connection of a quiet spell go), and would fail it again."""
        aiohttp = _aiohttp()
        session = await _sessions.get()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        try:
            async with session.post(url, data=data, headers=self.headers, timeout=timeout, proxy=proxy) as response:
                return response.status, response.headers, await response.read()
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not _reused.get():
                raise
            logger.debug("a kept connection to %s was closed by the server (%s): sent again on a new one", url, exc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            async with fresh.post(url, data=data, headers=self.headers, timeout=timeout, proxy=proxy) as response:
                return response.status, response.headers, await response.read()

    async def _once(self, url: str, data: bytes, proxy: str | None) -> dict[str, Any]:
        status, headers, body = await self._post(url, data, proxy)
        if status >= 400:
            raise self._http_error(status, body, headers)
        try:
            reply = _loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _replied(_not_json(status, headers, body, exc), status) from exc
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
            raise _replied(f"the reply (HTTP {status}) has no choices: {body[:200]!r}", status)
        return reply

    def _http_error(self, status: int, body: bytes, headers):
        if self._reader is None:  # DSPy's reading of an OpenAI-compatible server's error body, vLLM's dialect
            self._reader = _lm15().OpenAIChatLM(base_url="http://unused/v1", api_key="unused", compat="vllm")
        error = self._reader.normalize_error(status, body.decode("utf-8", errors="replace"))
        if getattr(error, "retry_after", None) is None:
            error.retry_after = _retry_after(headers.get("retry-after"))
        if getattr(error, "request_id", None) is None:
            error.request_id = headers.get("x-request-id")
        return error

    def _canonical(self, exc: BaseException):
        lm15 = _lm15()
        if isinstance(exc, lm15.LM15Error):
            return exc
        if isinstance(exc, asyncio.TimeoutError):  # aiohttp's connect and read timeouts are both TimeoutErrors
            error = lm15.TimeoutError(
                f"no reply within timeout_s = {self.timeout_s:g} s ({type(exc).__name__})", provider=PROVIDER
            )
        else:
            error = lm15.TransportError(f"{type(exc).__name__}: {exc}", provider=PROVIDER)
        error.__cause__ = exc
        return error

    def _dspy_error(self, error):
        from dspy.clients.errors import wrap_error

        return wrap_error(error, model=self.model, provider=PROVIDER)


def _replied(message: str, status: int):
    """A reply that arrived but is not an answer (HTTP 200, not JSON): the request may have been served, so it
    is never sent again (DSPy's rule)."""
    error = _lm15().ProviderError(message, provider=PROVIDER, status=status)
    error.replied = True
    return error


@functools.lru_cache(maxsize=256)
def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``, as DSPy's transport (httpx) reads it: ``http_proxy`` or
    ``https_proxy`` for the URL's scheme, else ``all_proxy`` (either case each), none for a host ``no_proxy``
    names, nor for one on this machine (:func:`reflectagent.serving.loopback.bypasses_proxy`, the rule every
    client of reflectagent's follows); one written without a scheme is an HTTP proxy. Read once per endpoint (aiohttp's ``trust_env`` reads
    them in a thread at every request, and leaves ``all_proxy`` out).

    aiohttp speaks to HTTP proxies only: a SOCKS proxy (``all_proxy``'s usual kind) is refused with what to do,
    not sent HTTP, nor passed by unseen (httpx refuses it too, without its ``socks`` extra)."""
    parts = urllib.parse.urlsplit(url)
    if bypasses_proxy(url) or (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        return None  # a proxy elsewhere cannot reach this machine's loopback (where the embedded server listens)
    proxies = urllib.request.getproxies()
    name = parts.scheme if proxies.get(parts.scheme) else "all"
    proxy = proxies.get(name)
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    scheme = proxy.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"{name}_proxy names a {scheme} proxy for {parts.hostname}, which reflectagent's client for "
            "vLLM servers cannot use (it speaks to HTTP proxies only): name the server's host in "
            "no_proxy, or an http:// proxy"
        )
    return proxy


def _retryable(error: BaseException) -> bool:
    from dspy.utils.exceptions import is_retryable_lm_error

    return is_retryable_lm_error(error)


def _delay(error: BaseException, attempt: int) -> float:
    """DSPy's backoff: the server's ``Retry-After`` if it gave one, else 1, 2, 4 ... 60 s."""
    hint = getattr(error, "retry_after", None)
    return (
        hint if isinstance(hint, (int, float)) and math.isfinite(hint) and hint >= 0 else min(2 ** min(attempt, 6), 60)
    )


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _not_json(status: int, headers, body: bytes, exc: Exception) -> str:
    excerpt = body[:200].decode("utf-8", errors="replace") + ("…" if len(body) > 200 else "")
    return (
        f"the reply (HTTP {status}, {headers.get('content-type') or 'no content-type'}, {len(body)} bytes) is not "
        f"JSON: {exc}. Body starts: {excerpt!r}. A gateway or proxy in front of the server is the usual cause; "
        "the request may or may not have been served."
    )


def _loads(body: bytes):
    """JSON, read by orjson where it is installed (a reply with every token's log-probabilities is most of this
    client's CPU under ``json``); by ``json`` what orjson refuses and ``json`` takes (a lone surrogate, NaN)."""
    if _orjson is not None:
        try:
            return _orjson.loads(body)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(body)


try:
    import orjson as _orjson
except ImportError:  # optional: json reads the same replies
    _orjson = None


def _aiohttp():
    import aiohttp

    return aiohttp


def _lm15():
    from dspy import lm15

    return lm15


_reused: contextvars.ContextVar[bool] = contextvars.ContextVar("reflectagent_reused_connection", default=False)


@functools.cache
def _connector_class():
    """aiohttp's pool, telling each request whether its connection carried one before (:data:`_reused`, set in the
    context of the task that sends it): only such a connection can have been closed by the server unseen (see
    ``ChatClient._post``)."""
    aiohttp = _aiohttp()

    class Connector(aiohttp.TCPConnector):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._carried: weakref.WeakSet = weakref.WeakSet()

        async def connect(self, req, traces, timeout):
            _reused.set(False)  # a connection that cannot be made is no kept one
            connection = await super().connect(req, traces, timeout)
            _reused.set(connection.protocol in self._carried)
            self._carried.add(connection.protocol)
            return connection

    return Connector


class _Sessions:
    """One aiohttp session (a connection pool) per event loop that makes requests."""

    def __init__(self):
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}
        self._guard = threading.Lock()

    async def get(self):
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        if found is not None:
            return found[0]
        aiohttp = _aiohttp()
        self._sweep()
        # no pool limit of its own: callers bound their concurrency
        session = aiohttp.ClientSession(connector=_connector_class()(limit=0, keepalive_timeout=KEEPALIVE_S))
        state = {"abandoned": False}
        closer = _close_with_loop(session, state)
        with self._guard:
            self._by_loop[loop] = (session, closer, state)
        await closer.__anext__()  # registered with the loop: asyncio.run's shutdown_asyncgens closes the session
        return session

    def _sweep(self) -> None:
        """Let go of the sessions of loops that closed without shutting their async generators down."""
        with self._guard:
            closed = [loop for loop in self._by_loop if loop.is_closed()]
            entries = [self._by_loop.pop(loop) for loop in closed]
        for session, closer, state in entries:
            _abandon(session, closer, state)

    def close_all(self) -> None:
        """At exit: close the sessions of loops still running in other threads (the shared loop)."""
        with self._guard:
            entries = list(self._by_loop.items())
            self._by_loop.clear()
        for loop, (session, closer, state) in entries:
            if loop.is_running() and not _in_loop(loop):
                try:
                    asyncio.run_coroutine_threadsafe(session.close(), loop).result(2)
                except Exception:  # at exit, a session that cannot close in time is let go
                    pass
            _abandon(session, closer, state)

    def forget_in_child(self) -> None:
        """A forked child cannot use its parent's loops or sockets: it keeps them unused (closing them would
        close the parent's connections) and opens its own."""
        _orphans.extend(self._by_loop.values())
        self._by_loop = {}
        self._guard = threading.Lock()


async def _close_with_loop(session, state):
    try:
        yield
    finally:
        if not state["abandoned"]:
            await session.close()


def _abandon(session, closer, state) -> None:
    """Let a session go without its loop: marked closed (no 'Unclosed client session' at collection), its
    sockets closed with the process; its closer finished here, so the dead loop is never asked to run it."""
    state["abandoned"] = True
    try:
        closer.aclose().send(None)
    except (StopIteration, RuntimeError):
        pass
    connector = session.connector
    session.detach()
    if connector is not None and not connector.closed:
        try:
            connector._close()  # close()'s synchronous part, without the awaitable a dead loop cannot run
        except Exception:
            pass


def _in_loop(loop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


_orphans: list = []
_sessions = _Sessions()
atexit.register(_sessions.close_all)
os.register_at_fork(after_in_child=_sessions.forget_in_child)
