"""The reward service: any judge as a reward model over HTTP, for OpenRLHF and anything that can POST
(``reflectagent serve-rm`` runs it; :func:`create_app` is the FastAPI app, for tests and other servers).

Routes: OpenRLHF's ``POST /get_reward`` (``{"query", "prompts", "labels"}`` in; ``{"rewards", "scores",
"extra_logs"}`` out), ``POST /v1/judge`` (a pair), ``POST /v1/rank`` (a prompt and N responses: GRPO group
rewards), ``GET /health`` and ``GET /metrics`` (Prometheus). The rewards are :class:`reflectagent.rl.Rewarder`'s,
through the judgment cache. At most ``max_concurrency`` requests judge at once and ``max_queue`` more wait;
beyond that the answer is 503 with ``Retry-After``, so memory does not grow with the load. Every accepted
request gets its answer, a 504 after ``timeout_s`` (its steps still finish into the cache), or an error.
``serve-rm`` binds loopback unless ``--host`` says otherwise; an optional bearer token is required; bodies
over ``max_body_bytes`` are refused, and so is a request that would take more than ``max_judgments`` judgments
(a group of N distinct responses costs N(N-1)/2 up to ``round_robin_up_to``, N - 1 above). A request head must
arrive within ``header_timeout_s``, and its body within ``body_timeout_s`` (:mod:`reflectagent.rl.http`).

Every error is an answer with a reason, never a bare 500: JSON that is not JSON's (``NaN``, ``Infinity``) or
not text (a lone surrogate escape) is 400, a backend that is down or slow 503 with ``Retry-After``, one that
fails otherwise 502, and each is counted in ``/metrics`` (``reflectagent_request_errors_total``, by route,
status and reason). ``/metrics`` also carries the judge's rolling health gauges (:mod:`reflectagent.rl.monitors`:
reward against length, order flips, ties, abstains, margin), fed by every judgment a route answers with.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from dspy.utils.exceptions import LMError

from reflectagent.judging.runs import is_transient
from reflectagent.records.pairs import InvalidPair, Pair
from reflectagent.rl.adapters import RewardInputError, openrlhf_batch
from reflectagent.rl.monitors import WINDOW, Monitor
from reflectagent.rl.rewards import GroupTooLarge, Rewarder


logger = logging.getLogger(__name__)
T = TypeVar("T")


class RewardRequest(BaseModel):
    query: list[str] = Field(description="each the prompt followed by the response")
    prompts: list[str]
    labels: list[str] | None = Field(None, description="reference answers: the rewards become pairwise against them")


class JudgeRequest(BaseModel):
    prompt: str
    response_a: str
    response_b: str


class RankRequest(BaseModel):
    prompt: str
    responses: list[str]


MAX_JUDGMENTS = 2048  # per request: 2,048 judgments against references, or groups (one of 64 judged round robin: 2,016)


class Refused(Exception):
    """A request answered with an error: its status, a short ``reason`` (the metric label: one of a fixed few) and
    what to do, in ``detail``."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers


class Busy(Refused):
    """More requests than the service holds: answered 503 with Retry-After."""

    def __init__(self, retry_after_s: int = 5):
        super().__init__(
            503, "at_capacity", "the reward model is at capacity: retry later", {"Retry-After": str(retry_after_s)}
        )


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str) -> object:
    raise _NotFinite(name)


def _lone_surrogate(value: object) -> str | None:
    """Where the first string holding a lone surrogate escape is in a parsed body (``query[3]``), or None. Walked
    with a stack, not recursion: a body nested as deep as the JSON reader allows is walked too."""
    stack: list[tuple[str, object]] = [("body", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return f"{where} holds a lone surrogate escape at character {exc.start + 1}"
        elif isinstance(item, dict):
            stack += [(f"{where}.{key}" if where != "body" else str(key), v) for key, v in item.items()]
            stack += [(f"{where} (a key)", key) for key in item]
        elif isinstance(item, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(item)]
    return None


async def strict_json(request: Request) -> None:
    """What FastAPI's JSON reading lets through and the judges cannot take, refused as 400 before the body is used:
    ``NaN``/``Infinity`` (Python reads them; JSON has no such numbers, and the 422 that would quote them back cannot
    be written) and a lone surrogate escape (JSON allows ``"\\ud800"``; no text encoding does)."""
    try:
        parsed = json.loads(await request.body(), parse_constant=_refuse_constant)
    except _NotFinite as exc:
        raise Refused(
            400, "not_finite", f"the body holds {exc}, which is not a JSON number: send finite numbers"
        ) from None
    except (ValueError, RecursionError):  # not JSON at all: FastAPI has answered it already
        return
    where = _lone_surrogate(parsed)
    if where is not None:
        raise Refused(400, "not_text", f"{where}, which is not text: fix or remove that \\u escape")


ROUTES = ("/get_reward", "/v1/judge", "/v1/rank", "/health", "/metrics")  # metric labels: any other path is "other"


class Gate:
    """At most ``running`` requests judging at once on the event loop and ``waiting`` more; the rest are
    turned away at once. A place is given back when its work has really finished, not when its request
    timed out or its client went away, so work left running cannot pile up beyond the bound."""

    def __init__(self, running: int, waiting: int):
        self.semaphore, self.capacity, self.held = asyncio.Semaphore(running), running + waiting, 0

    def _release(self, task: asyncio.Task) -> None:
        self.semaphore.release()
        self.held -= 1
        if not task.cancelled() and task.exception() is not None:  # retrieved here: its request may be gone
            logger.debug("judging for a request that was not waiting failed: %r", task.exception())

    async def run(self, work: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """``await work()`` within ``timeout_s`` (TimeoutError after it; the work goes on and keeps its place)."""
        if self.held >= self.capacity:
            raise Busy()
        self.held += 1
        try:
            await self.semaphore.acquire()
        except BaseException:  # cancelled while waiting: the place was never taken
            self.held -= 1
            raise
        task = asyncio.ensure_future(work())
        task.add_done_callback(self._release)
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)


def create_app(
    rewarder: Rewarder,
    *,
    max_concurrency: int = 8,
    max_queue: int = 64,
    timeout_s: float = 170,
    max_body_bytes: int = 8 << 20,
    token: str | None = None,
    retry_after_s: int = 5,
    max_judgments: int = MAX_JUDGMENTS,
    judge_name: str | None = None,
    monitor_window: int = WINDOW,
) -> FastAPI:
    """The service for ``rewarder``; ``judge_name`` labels the monitor gauges (default: the judge's class name)."""
    app = FastAPI(title="reflectagent reward model", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    requests = Counter("reflectagent_requests", "requests answered", ["route", "status"], registry=registry)
    errors = Counter(
        "reflectagent_request_errors",
        "requests answered with an error, by reason",
        ["route", "status", "reason"],
        registry=registry,
    )
    latency = Histogram(
        "reflectagent_request_seconds",
        "request latency",
        ["route"],
        registry=registry,
        buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
    )
    lm_calls = Counter("reflectagent_lm_calls", "LM calls made for requests", registry=registry)
    cache_hits = Counter("reflectagent_cache_hits", "steps served from the judgment cache", registry=registry)
    no_verdict = Counter(
        "reflectagent_no_verdict", "rewards or judgments with no verdict behind them", registry=registry
    )
    gate = Gate(max_concurrency, max_queue)
    monitor = Monitor(judge_name or rewarder.name, monitor_window, registry)

    def route_of(request: Request) -> str:
        return request.url.path if request.url.path in ROUTES else "other"

    def answer(request: Request, status: int, reason: str, detail, headers: dict | None = None) -> JSONResponse:
        request.state.error_reason = reason  # the middleware counts it, with the status
        return JSONResponse({"detail": detail, "reason": reason}, status_code=status, headers=headers)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return answer(request, exc.status, exc.reason, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # where and what, never the input: it may be NaN (which no JSON response can hold) or megabytes of text
        problems = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        for problem in problems:
            if problem["loc"] == ["body"]:  # the body as a whole is not an object: most often no JSON content type
                problem["msg"] += ": send a JSON object, with Content-Type: application/json"
        reason = "bad_json" if any(p["type"] == "json_invalid" for p in problems) else "invalid_request"
        return answer(request, 422, reason, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        reason = {400: "bad_json", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        detail = exc.detail
        if exc.status_code == 400:  # FastAPI's words when Python's JSON reader raised (too deep, a number too long)
            detail = (
                "the body could not be read as JSON (nested too deep, or a number too long to read): send plain JSON"
            )
        return answer(request, exc.status_code, reason, detail, getattr(exc, "headers", None))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route, started = route_of(request), time.perf_counter()
        if token is not None and route != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _answer(requests, errors, route, 401, "unauthorized", "missing or wrong bearer token")
        size = request.headers.get("content-length")
        if "transfer-encoding" in request.headers:  # the length must be known before the body is read
            return _answer(
                requests, errors, route, 411, "no_length", "send the body with a Content-Length, not Transfer-Encoding"
            )
        if request.method == "POST" and (size is None or not size.isdigit()):
            return _answer(requests, errors, route, 411, "no_length", "send a Content-Length header with the body")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return _answer(
                requests,
                errors,
                route,
                413,
                "body_too_big",
                f"body over {max_body_bytes} bytes: send fewer items per request",
            )
        try:
            response = await call_next(request)
        except Exception:  # a bug: still an answer with a reason, and counted
            logger.exception("request to %s failed", route)
            response = answer(
                request, 500, "internal", "the reward service failed on this request: its log has the details"
            )
        requests.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            errors.labels(
                route, str(response.status_code), getattr(request.state, "error_reason", f"http_{response.status_code}")
            ).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        return response

    def check_size(judgments: int) -> None:
        if judgments > max_judgments:
            raise Refused(
                413,
                "too_many_judgments",
                f"this request needs {judgments} judgments, over --max-judgments "
                f"({max_judgments}): a group of N distinct responses takes N(N-1)/2 up to --round-robin-up-to, N - 1 above; "
                "send fewer or smaller groups per request",
            )

    async def judged(fn, *args):
        try:
            return await gate.run(lambda: fn(*args), timeout_s)
        except asyncio.TimeoutError:
            raise Refused(
                504,
                "timeout",
                f"no answer within {timeout_s:.0f} s; the judgment goes on into the cache, "
                "so the same request again is answered from it",
            ) from None
        except Busy:
            raise Busy(retry_after_s) from None
        except GroupTooLarge as exc:  # work the service refuses to take on
            raise Refused(413, "group_too_large", str(exc)) from None
        except Refused:
            raise
        except Exception as exc:
            said = f"{type(exc).__name__}: {str(exc)[:300]}"
            if is_transient(exc):  # down, slow or busy: the same request later can succeed
                raise Refused(
                    503,
                    "backend_unavailable",
                    f"the judge's backend did not answer ({said}): retry later",
                    {"Retry-After": str(retry_after_s)},
                ) from None
            if isinstance(exc, LMError):
                raise Refused(502, "backend_error", f"the judge's backend failed ({said})") from None
            logger.exception("judging failed")
            raise Refused(
                500, "internal", f"judging failed ({type(exc).__name__}): the service's log has the details"
            ) from None

    def account(usage_calls: int, hits: int, missing: int) -> None:
        lm_calls.inc(usage_calls)
        cache_hits.inc(hits)
        no_verdict.inc(missing)

    @app.post("/get_reward", dependencies=[Depends(strict_json)])
    async def get_reward(body: RewardRequest):
        if not body.query:
            raise Refused(400, "bad_input", "query is empty: send at least one prompt + response")
        try:
            batch = openrlhf_batch(body.query, body.prompts, body.labels)
        except RewardInputError as exc:
            raise Refused(400, "bad_input", str(exc)) from None
        check_size(rewarder.judgments_needed(batch[0], batch[2], responses=batch[1]))
        results = await judged(rewarder.arewards, *batch)
        account(
            sum(r.usage.lm_calls for r in results),
            sum(r.cache_hits for r in results),
            sum(not r.verdict for r in results),
        )
        monitor.judged(j for r in results for j in r.judgments)
        monitor.scored(*_decided(batch[1], [None if r.abstain else r.score for r in results]))
        return {
            "rewards": [r.reward for r in results],
            "scores": [r.score for r in results],
            "extra_logs": {
                "abstain": [1.0 if r.abstain else 0.0 for r in results],
                "no_verdict_reward": rewarder.no_verdict_reward,
            },
        }

    @app.post("/v1/judge", dependencies=[Depends(strict_json)])
    async def judge(body: JudgeRequest):
        try:
            pair = Pair(prompt=body.prompt, response_a=body.response_a, response_b=body.response_b)
        except InvalidPair as exc:
            raise Refused(400, "bad_input", str(exc)) from None

        judgment = await judged(rewarder.ajudge_pair, pair)
        account(judgment.lm_calls, judgment.cache_hits, judgment.preference is None)
        monitor.judged([judgment])
        score = (
            judgment.probability_a
            if judgment.probability_a is not None
            else {"A": 1.0, "B": 0.0}.get(judgment.preference)
        )
        monitor.scored(*_decided([pair.response_a, pair.response_b], [score, None if score is None else 1 - score]))
        cost = judgment.cost
        return {
            "preference": judgment.preference,
            "probability_a": judgment.probability_a,
            "reason": judgment.reason,
            "abstain": judgment.preference is None and judgment.probability_a is None,
            "decided_by": judgment.decided_by,
            "analyses": [asdict(a) for a in judgment.analyses],
            "reflections": [asdict(r) for r in judgment.reflections],
            "ratings": [asdict(r) for r in judgment.ratings],
            "cost": {
                "lm_calls": cost.lm_calls,
                "prompt_tokens": cost.prompt_tokens,
                "completion_tokens": cost.completion_tokens,
                "latency_s": cost.latency_s,
                "cache_hits": judgment.cache_hits,
            },
        }

    @app.post("/v1/rank", dependencies=[Depends(strict_json)])
    async def rank_route(body: RankRequest):
        if len(body.responses) < 2:
            raise Refused(400, "bad_input", "responses needs at least two: a group reward compares them")
        if len(body.responses) > rewarder.max_group:
            raise Refused(
                413,
                "group_too_large",
                f"{len(body.responses)} responses is over max_group ({rewarder.max_group}): send smaller groups",
            )
        if not body.prompt.strip():
            raise Refused(400, "bad_input", "the prompt is empty: there is nothing to judge the responses against")
        check_size(rewarder.judgments_needed([body.prompt] * len(body.responses), responses=body.responses))

        ranking = await judged(rewarder.arank, body.prompt, body.responses)
        undecided = sum(c.judgment.preference is None for c in ranking.comparisons)
        account(ranking.usage.lm_calls, sum(c.judgment.cache_hits for c in ranking.comparisons), undecided)
        abstains = Rewarder.abstains(ranking)
        monitor.judged(c.judgment for c in ranking.comparisons)
        monitor.scored(*_decided(body.responses, [None if a else w for a, w in zip(abstains, ranking.win_rate)]))
        ranks = [0] * len(body.responses)
        for place, index in enumerate(ranking.order, 1):
            ranks[index] = place
        return {
            "scores": list(ranking.win_rate),
            "strength": list(ranking.strength),
            "ranks": ranks,
            "order": list(ranking.order),
            "comparisons": len(ranking.comparisons),
            "no_verdict_comparisons": undecided,
            "abstain": abstains,
        }

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "program": type(rewarder.judge).__name__,
            "backend": rewarder.lm.model,
            "in_flight": gate.held,
            "capacity": gate.capacity,
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _decided(responses: list[str], scores: list[float | None]) -> tuple[list[int], list[float]]:
    """The lengths and [0, 1] scores of the responses a verdict stood behind (None: abstained), for the monitor."""
    kept = [(len(r), s) for r, s in zip(responses, scores) if s is not None]
    return [n for n, _ in kept], [s for _, s in kept]


def _answer(requests, errors, route: str, status: int, reason: str, detail: str) -> JSONResponse:
    """An answer the middleware gives before the app sees the request, counted as the app's answers are."""
    requests.labels(route, str(status)).inc()
    errors.labels(route, str(status), reason).inc()
    return JSONResponse({"detail": detail, "reason": reason}, status_code=status)
