"""``reflectagent serve-rm``: any judge as a reward model over HTTP, for OpenRLHF and anything that can POST.

Routes: OpenRLHF's ``POST /get_reward`` (``{"query", "prompts", "labels"}`` in; ``{"rewards", "scores",
"extra_logs"}`` out), ``POST /v1/judge`` (a pair), ``POST /v1/rank`` (a prompt and N responses: GRPO group
rewards), ``GET /health`` and ``GET /metrics`` (Prometheus). The rewards are :class:`reflectagent.rl.Rewarder`'s,
through the judgment cache. At most ``max_concurrency`` requests judge at once and ``max_queue`` more wait;
beyond that the answer is 503 with ``Retry-After``, so memory does not grow with the load. Every accepted
request gets its answer, a 504 after ``timeout_s`` (its steps still finish into the cache), or an error.
Loopback unless ``--host`` says otherwise; an optional bearer token from an environment variable; bodies
over ``max_body_bytes`` are refused.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Annotated, Optional, TypeVar

import typer
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from reflectagent.cli.common import ConfigOpt, CacheDirOpt, fail, open_cache
from reflectagent.config import load_settings
from reflectagent.pairs import InvalidPair, Pair
from reflectagent.rl.adapters import RewardInputError, openrlhf_batch
from reflectagent.rl.rewards import Rewarder


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


class Busy(Exception):
    """More requests than the service holds: answered 503 with Retry-After."""


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


def create_app(rewarder: Rewarder, *, max_concurrency: int = 8, max_queue: int = 64, timeout_s: float = 170,
               max_body_bytes: int = 8 << 20, token: str | None = None, retry_after_s: int = 5) -> FastAPI:
    app = FastAPI(title="reflectagent reward model", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    requests = Counter("reflectagent_requests", "requests answered", ["route", "status"], registry=registry)
    latency = Histogram("reflectagent_request_seconds", "request latency", ["route"], registry=registry,
                        buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
    lm_calls = Counter("reflectagent_lm_calls", "LM calls made for requests", registry=registry)
    cache_hits = Counter("reflectagent_cache_hits", "steps served from the judgment cache", registry=registry)
    no_verdict = Counter("reflectagent_no_verdict", "rewards or judgments with no verdict behind them", registry=registry)
    gate = Gate(max_concurrency, max_queue)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return JSONResponse({"detail": "the reward model is at capacity: retry later"}, status_code=503,
                            headers={"Retry-After": str(retry_after_s)})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route, started = request.url.path if request.url.path in ROUTES else "other", time.perf_counter()
        if token is not None and route != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _answer(requests, route, 401, {"detail": "missing or wrong bearer token"})
        size = request.headers.get("content-length")
        if "transfer-encoding" in request.headers:  # the length must be known before the body is read
            return _answer(requests, route, 411, {"detail": "send the body with a Content-Length, not Transfer-Encoding"})
        if request.method == "POST" and (size is None or not size.isdigit()):
            return _answer(requests, route, 411, {"detail": "send a Content-Length header with the body"})
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return _answer(requests, route, 413, {"detail": f"body over {max_body_bytes} bytes: send fewer items per request"})
        response = await call_next(request)
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        return response

    async def judged(fn, *args):
        try:
            return await gate.run(lambda: fn(*args), timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within {timeout_s:.0f} s; the judgment goes on into the cache, "
                                     "so the same request again is answered from it") from None
        except ValueError as exc:  # work the service refuses to take on (a group over max_group)
            raise HTTPException(413, str(exc)) from None

    def account(usage_calls: int, hits: int, missing: int) -> None:
        lm_calls.inc(usage_calls)
        cache_hits.inc(hits)
        no_verdict.inc(missing)

    @app.post("/get_reward")
    async def get_reward(body: RewardRequest):
        if not body.query:
            raise HTTPException(400, "query is empty: send at least one prompt + response")
        try:
            batch = openrlhf_batch(body.query, body.prompts, body.labels)
        except RewardInputError as exc:
            raise HTTPException(400, str(exc)) from None
        results = await judged(rewarder.arewards, *batch)
        account(sum(r.usage.lm_calls for r in results), sum(r.cache_hits for r in results), sum(not r.verdict for r in results))
        return {"rewards": [r.reward for r in results], "scores": [r.score for r in results],
                "extra_logs": {"no_verdict": [0 if r.verdict else 1 for r in results],
                               "no_verdict_reward": rewarder.no_verdict_reward}}

    @app.post("/v1/judge")
    async def judge(body: JudgeRequest):
        try:
            pair = Pair(prompt=body.prompt, response_a=body.response_a, response_b=body.response_b)
        except InvalidPair as exc:
            raise HTTPException(400, str(exc)) from None

        judgment = await judged(rewarder.ajudge_pair, pair)
        account(judgment.lm_calls, judgment.cache_hits, judgment.preference is None)
        cost = judgment.cost
        return {"preference": judgment.preference, "probability_a": judgment.probability_a, "reason": judgment.reason,
                "analyses": [asdict(a) for a in judgment.analyses], "reflections": [asdict(r) for r in judgment.reflections],
                "ratings": [asdict(r) for r in judgment.ratings],
                "cost": {"lm_calls": cost.lm_calls, "prompt_tokens": cost.prompt_tokens,
                         "completion_tokens": cost.completion_tokens, "latency_s": cost.latency_s,
                         "cache_hits": judgment.cache_hits}}

    @app.post("/v1/rank")
    async def rank_route(body: RankRequest):
        if len(body.responses) < 2:
            raise HTTPException(400, "responses needs at least two: a group reward compares them")
        if len(body.responses) > rewarder.max_group:
            raise HTTPException(413, f"{len(body.responses)} responses is over max_group ({rewarder.max_group}): send smaller groups")
        if not body.prompt.strip():
            raise HTTPException(400, "the prompt is empty: there is nothing to judge the responses against")

        ranking = await judged(rewarder.arank, body.prompt, body.responses)
        undecided = sum(c.judgment.preference is None for c in ranking.comparisons)
        account(ranking.usage.lm_calls, sum(c.judgment.cache_hits for c in ranking.comparisons), undecided)
        ranks = [0] * len(body.responses)
        for place, index in enumerate(ranking.order, 1):
            ranks[index] = place
        return {"scores": list(ranking.win_rate), "strength": list(ranking.strength), "ranks": ranks,
                "order": list(ranking.order), "comparisons": len(ranking.comparisons), "no_verdict_comparisons": undecided}

    @app.get("/health")
    async def health():
        return {"status": "ok", "program": type(rewarder.judge).__name__, "backend": rewarder.lm.model,
                "in_flight": gate.held, "capacity": gate.capacity}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _answer(requests, route: str, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    requests.labels(route, str(status)).inc()
    return JSONResponse(body, status_code=status, headers=headers)


def serve_rm(
    program: Annotated[str, typer.Option("--program", "-p", help="a named program (see `judge --help`)")] = "genrm-prob",
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="backend name from the config")] = None,
    host: Annotated[str, typer.Option(help="address to bind: loopback unless you mean otherwise")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port")] = 5000,
    group: Annotated[str, typer.Option(help="group rewards without labels: win_rate or bradley_terry")] = "win_rate",
    no_verdict_reward: Annotated[Optional[float], typer.Option(help="the reward where no verdict stood behind it (flagged; default: 0.5, or 0 for bradley_terry)")] = None,
    max_concurrency: Annotated[int, typer.Option(min=1, help="requests judged at once")] = 8,
    max_queue: Annotated[int, typer.Option(min=0, help="requests that may wait; beyond, 503 with Retry-After")] = 64,
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds a request may take before a 504 (OpenRLHF's client gives up at 180)")] = 170,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body")] = 8 << 20,
    token_env: Annotated[Optional[str], typer.Option(help="environment variable holding a bearer token to require")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Serve a judge as a reward model (OpenRLHF's /get_reward, /v1/judge, /v1/rank, /health, /metrics)."""
    import uvicorn

    from reflectagent.cache import use_cache

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            fail(f"${token_env} is not set: export the token there, or leave out --token-env", 2)
    for name, value in (("max-concurrency", max_concurrency), ("max-queue", max_queue), ("timeout", timeout), ("max-body-bytes", max_body_bytes)):
        if value <= 0 and not (name == "max-queue" and value == 0):
            fail(f"--{name} must be positive", 2)
    settings = load_settings(config)
    rewarder = Rewarder(program, backend, settings, group=group, no_verdict_reward=no_verdict_reward, concurrency=max_concurrency)
    app = create_app(rewarder, max_concurrency=max_concurrency, max_queue=max_queue, timeout_s=timeout,
                     max_body_bytes=max_body_bytes, token=token)
    with use_cache(open_cache(settings, cache_dir)):
        typer.echo(f"reward model: {program} on {rewarder.lm.model} at http://{host}:{port} (POST /get_reward, /v1/judge, /v1/rank)")
        uvicorn.run(app, host=host, port=port, log_level="warning")
