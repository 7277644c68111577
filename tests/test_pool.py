"""A backend over a pool of replicas (LiteLLM's Router): requests spread over them, a failing or dead
replica is left out and its requests go to another, and the cache keys on the model, not the replica.
Fake engines on loopback for the rules; two real vLLM servers, one killed midway, for the real thing."""

from __future__ import annotations

import dspy
import pytest
from fakes import Engine

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import GenRM

PAIRS = [Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(12)]


def pool(first: str, *more: str, model: str = "openai/fake", **options) -> Settings:
    return Settings(
        backends={
            "pool": BackendConfig(
                model=model,
                api_base=first,
                replicas=list(more),
                api_key_env="FAKE_KEY",
                constrained=False,
                logprobs=False,
                num_retries=2,
                timeout_s=30,
                **options,
            )
        }
    )


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")


def test_requests_spread_over_the_replicas_and_a_failing_one_is_left_out(tmp_path):
    healthy, other, failing = Engine(), Engine(), Engine("--fault", "503")
    try:
        lm = resolve_backend("pool", pool(f"{healthy.url}/v1", f"{other.url}/v1", f"{failing.url}/v1"))
        with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=lm):
            many = [Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(24)]
            judged = judge_pairs(GenRM(), many, concurrency=1, progress=False)
        assert [j.preference for j in judged] == ["A"] * len(many)
        assert (
            healthy.count() > 0 and other.count() > 0 and healthy.count() + other.count() == len(many)
        )  # each step once
        assert (
            failing.count() <= 3
        )  # a third of 24 without cooldown: it failed, was left out, its requests went elsewhere
    finally:
        for engine in (healthy, other, failing):
            engine.stop()


def test_a_replica_that_dies_midway_loses_nothing_and_the_cache_does_not_care_which_answered(tmp_path):
    dying, staying = Engine("--die-after", "3"), Engine()
    try:
        settings = pool(f"{dying.url}/v1", f"{staying.url}/v1", routing_strategy="simple-shuffle")
        with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("pool", settings)):
            judged = judge_pairs(GenRM(), PAIRS, concurrency=2, progress=False)
        assert [j.preference for j in judged] == ["A"] * len(PAIRS)
        assert dying.process.poll() is not None or dying.count() <= 3
        # the same steps through the other replica alone, or through a pool in the other order: all cached
        for alone in (pool(f"{staying.url}/v1", f"{dying.url}/v1"), pool(f"{staying.url}/v1", f"{staying.url}/v1")):
            before = staying.count()
            with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("pool", alone)):
                again = judge_pairs(GenRM(), PAIRS, concurrency=2, progress=False)
            assert [j.preference for j in again] == ["A"] * len(PAIRS) and staying.count() == before
    finally:
        dying.stop()
        staying.stop()


def test_replicas_need_a_first_endpoint_and_a_served_model():
    with pytest.raises(ValueError, match="replicas need api_base"):
        BackendConfig(model="openai/fake", replicas=["http://127.0.0.1:1/v1"])
    with pytest.raises(ValueError, match="not of the embedded backend"):
        BackendConfig(model="embedded", api_base="http://x/v1", replicas=["http://127.0.0.1:1/v1"])


@pytest.mark.server
def test_two_vllm_replicas_one_killed_midway_the_run_completes_on_the_other(model_dir, tmp_path):
    import threading

    from reflectagent.server import ServerSpec, VLLMServer

    servers = [
        VLLMServer(ServerSpec(model_dir=str(model_dir), served_name="judge"), log_path=tmp_path / f"vllm{i}.log")
        for i in range(2)
    ]
    for server in servers:
        server.start()
    try:
        settings = pool(servers[0].url, servers[1].url, model="hosted_vllm/judge", context_tokens=2048)
        settings.backends["pool"].constrained = settings.backends["pool"].logprobs = None  # vLLM's defaults: both on
        pairs = [
            Pair(prompt=f"What is {i} + {i}?", response_a=str(2 * i), response_b=str(2 * i + 1), label="A")
            for i in range(16)
        ]
        done = []

        def judge_all():
            with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("pool", settings)):
                done.extend(
                    judge_pairs(GenRM(both_orders=True, decision="probability"), pairs, concurrency=4, progress=False)
                )

        worker = threading.Thread(target=judge_all)
        worker.start()
        cache = JudgmentCache(tmp_path / "cache")
        while len(cache) < 6 and worker.is_alive():  # some steps made through both: now one replica dies
            threading.Event().wait(0.5)
        midway = worker.is_alive() and len(cache) < 2 * len(pairs)
        servers[0].stop(grace_s=0)
        worker.join(600)
        assert midway, "the run finished before a replica was killed: nothing was tested"
        assert len(done) == len(pairs) and all(j.probability_a is not None for j in done)
    finally:
        for server in servers:
            server.stop()
