"""A pool of replicas behind one backend: LiteLLM's Router as a DSPy engine.

One judge model served by several OpenAI-compatible endpoints (vLLM replicas: data parallelism) is
one backend. The Router spreads requests over them by its routing strategy, sends a failed request
to another replica and cools a failing replica down, so a run goes on while one dies. The judgment
cache keys on the model, never on the replica that answered (``backends._resolve_litellm``). A judge
too large for one device is one vLLM server with ``--tensor-parallel-size``: an ordinary backend.
"""

from __future__ import annotations

from typing import Any

from dspy.clients.engines.litellm_engine import AsyncLiteLLMEngine, LiteLLMEngine
from dspy.clients.engines.litellm_errors import litellm_errors
from dspy.lm15 import UnsupportedFeatureError

GROUP = "replicas"  # the Router's name for the one model all deployments serve


def make_router(
    model: str,
    endpoints: list[str],
    api_key: str | None,
    *,
    routing_strategy: str,
    num_retries: int,
    cooldown_s: float,
    timeout_s: float,
) -> Any:
    import litellm

    deployments = [
        {
            "model_name": GROUP,
            "litellm_params": {
                "model": model,
                "api_base": endpoint,
                "api_key": api_key or "not-needed",
                "timeout": timeout_s,
            },
        }
        for endpoint in endpoints
    ]
    return litellm.Router(
        model_list=deployments,
        routing_strategy=routing_strategy,
        num_retries=num_retries,
        allowed_fails=1,
        cooldown_time=cooldown_s,
        timeout=timeout_s,
        retry_after=0,
    )


def _arguments(engine, request) -> dict:
    data = engine._arguments(request)
    data.pop("num_retries", None)  # the Router's own retries (on another replica) apply, not none
    return {**data, "model": GROUP}


def _legacy(request: dict) -> dict:
    """DSPy's LiteLLM-shaped request for the Router: its model group, its retries, no endpoint of ours."""
    return {k: v for k, v in request.items() if k not in ("num_retries", "api_base", "api_key", "base_url")} | {
        "model": GROUP
    }


class RouterEngine(LiteLLMEngine):
    """One request through the Router (sync)."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def complete_legacy(self, lm, request, **context):
        from dspy.clients.call_context import completed_legacy
        from dspy.clients.call_result import CallResult

        with litellm_errors(model=lm.model):
            raw = self.router.completion(**_legacy(request))
        completed_legacy(raw)
        lm._check_truncation(raw)
        return CallResult.legacy(lm, raw, kwargs=request)

    def complete(self, request):
        with litellm_errors(model=request.model):
            raw = self.router.completion(**_arguments(self, request))
        return self._response(raw, request)

    def stream(self, request):
        raise UnsupportedFeatureError("a replica pool does not stream")


class AsyncRouterEngine(AsyncLiteLLMEngine):
    """One request through the Router (async)."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    async def complete_legacy(self, lm, request, **context):
        from dspy.clients.call_context import completed_legacy
        from dspy.clients.call_result import CallResult

        with litellm_errors(model=lm.model):
            raw = await self.router.acompletion(**_legacy(request))
        completed_legacy(raw)
        lm._check_truncation(raw)
        return CallResult.legacy(lm, raw, kwargs=request)

    async def complete(self, request):
        with litellm_errors(model=request.model):
            raw = await self.router.acompletion(**_arguments(self, request))
        return self._response(raw, request)

    async def stream(self, request):
        raise UnsupportedFeatureError("a replica pool does not stream")
