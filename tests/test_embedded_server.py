"""End to end against a real vLLM server of the embedded model, over HTTP."""

import contextvars
import json
import math
import threading
import time

import dspy
import pytest

from reflectagent.backends import backend, resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import PositionSwapJudge, RunInterrupted, judge_pairs
from reflectagent.pairs import Pair
from reflectagent.results import flip
from reflectagent.server import ServerError, ServerSpec, VLLMServer

pytestmark = pytest.mark.server


def settings(url=None, lora_dir=None):
    backends = {
        # the same server without constraints: the zero-shot model's raw behaviour
        "free": BackendConfig(model="hosted_vllm/embedded", api_base=url, constrained=False, max_tokens=8),
        "embedded": BackendConfig(model="embedded", context_chars=4000),
    }
    if lora_dir:
        backends["tuned"] = BackendConfig(
            model="embedded", lora={"test": str(lora_dir)}, adapter="test", context_chars=4000
        )
    return Settings(backends=backends)


def test_real_pairs_parse_and_map_back_to_the_original_order(server, cache, sample_pairs):
    pairs = sample_pairs[:6]
    with backend("embedded", settings()):
        judgments = judge_pairs(PositionSwapJudge(), pairs, concurrency=6, progress=False)
    for judgment in judgments:
        assert len(judgment.analyses) == 2 and [a.swapped for a in judgment.analyses] == [False, True]
        for analysis in judgment.analyses:
            assert analysis.parsed, analysis.error  # constrained decoding: always well-formed
            shown = json.loads(analysis.raw)["preference"]  # what the model said about the pair it saw
            assert analysis.preference == (flip(shown) if analysis.swapped else shown)
            assert 0.5 <= analysis.probability <= 1.0  # the chosen verdict's probability, from the token
        if judgment.preference is None:
            assert judgment.reason == "inconsistent across orders"
        else:
            assert {a.preference for a in judgment.analyses} == {judgment.preference}
        assert judgment.lm_calls == 2 and judgment.usage.prompt_tokens > 0 and judgment.usage.completion_tokens > 0


def test_second_run_is_served_from_the_cache(server, tmp_path, sample_pairs):
    pairs = sample_pairs[6:10]
    runs = []
    for _ in range(2):  # two cache objects on one folder, as two processes would have
        store = JudgmentCache(tmp_path / "shared-cache")
        with use_cache(store), backend("embedded", settings()):
            runs.append(judge_pairs(PositionSwapJudge(), pairs, progress=False))
        store.close()
    first, second = runs
    assert sum(j.lm_calls for j in first) == 8 and sum(j.cache_hits for j in first) == 0
    assert sum(j.lm_calls for j in second) == 0 and sum(j.cache_hits for j in second) == 8
    assert [j.preference for j in second] == [j.preference for j in first]
    assert [a.text for j in second for a in j.analyses] == [a.text for j in first for a in j.analyses]


def test_config_switches_backend_and_two_run_side_by_side(server, cache, sample_pairs, lora_dir):
    pair = sample_pairs[0]
    conf = settings(server.url, lora_dir)
    base, tuned = resolve_backend("embedded", conf), resolve_backend("tuned", conf)
    assert base.model == "hosted_vllm/embedded" and tuned.model == "hosted_vllm/test"
    assert base.backend.identity != tuned.backend.identity
    results = {}

    def run(name, lm):
        with dspy.context(lm=lm):
            results[name] = PositionSwapJudge().judge(pair)

    # plain threads start with an empty context: carry this test's cache into them
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(run, n, lm))
        for n, lm in (("base", base), ("tuned", tuned))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["base"].lm_calls == 2 and results["tuned"].lm_calls == 2  # no cross-backend cache hits
    assert all(a.parsed for j in results.values() for a in j.analyses)
    # the adapter really changes the model: its verdict probabilities differ from the base model's
    assert [a.probability for a in results["base"].analyses] != [a.probability for a in results["tuned"].analyses]


def test_base_requests_batched_with_an_adapters_get_no_adapter(server, sample_pairs):
    """vLLM's CPU LoRA ops apply the last adapter to base-model tokens in a shared batch (reflectagent's
    plugin mends them, :mod:`reflectagent.vllm_plugin`): sent at once, each model answers as it does alone."""
    import asyncio

    import httpx

    prompts = [pair.prompt[:400] for pair in sample_pairs[:3]]

    async def first_logprob(client, model, prompt):
        reply = await client.post(
            f"{server.url}/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 2,
                "temperature": 0,
                "logprobs": True,
            },
        )
        reply.raise_for_status()
        return [t["logprob"] for t in reply.json()["choices"][0]["logprobs"]["content"]]

    async def measure():
        async with httpx.AsyncClient(timeout=120) as client:
            alone = [[await first_logprob(client, m, p) for m in ("embedded", "test")] for p in prompts]
            together = [
                await asyncio.gather(*(first_logprob(client, m, p) for m in ("embedded", "test", "embedded")))
                for p in prompts
            ]
            return alone, together

    alone, together = asyncio.run(measure())
    for (base, tuned), (base_batched, tuned_batched, base_again) in zip(alone, together):
        assert abs(base[0] - tuned[0]) > 0.05  # the adapter changes the answer, so a mix-up would show
        for got, want in ((base_batched, base), (base_again, base), (tuned_batched, tuned)):
            assert got[0] == pytest.approx(want[0], abs=0.02)  # batching moves bf16 sums a little, never by an adapter


def test_unconstrained_output_that_does_not_parse_is_reported_not_guessed(server, cache, sample_pairs):
    with backend("free", settings(server.url)):
        judgment = PositionSwapJudge().judge(sample_pairs[1])
    assert judgment.preference is None and judgment.reason == "unparsed"
    for analysis in judgment.analyses:
        assert not analysis.parsed and analysis.preference is None and analysis.error.startswith("unparsed")
        assert analysis.raw  # what the model wrote is kept


def test_too_long_input_is_cut_with_a_note(server, cache):
    pair = Pair(
        prompt="Summarise this text.\n" + "The quick brown fox jumps over the lazy dog. " * 800,
        response_a="A fox jumps over a dog.",
        response_b="Cats sleep all day.",
    )
    with backend("embedded", settings()):
        judgment = PositionSwapJudge().judge(pair)
    assert all(a.parsed for a in judgment.analyses)
    assert any("truncated to fit the context: prompt" in note for note in judgment.notes)


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    server = VLLMServer(ServerSpec(model_dir=str(tmp_path)), log_path=tmp_path / "log.txt")
    with pytest.raises(ServerError, match="exited with code") as error:
        server.start(timeout_s=300)
    assert "log tail" in str(error.value) and len(str(error.value).splitlines()) > 3


def test_a_server_dying_mid_run_loses_nothing_and_the_rerun_resumes(
    server, model_dir, tmp_path, sample_pairs, monkeypatch
):
    pairs = sample_pairs[10:16]
    store = JudgmentCache(tmp_path / "cache")
    doomed = VLLMServer(ServerSpec(model_dir=str(model_dir), served_name="embedded"), log_path=tmp_path / "doomed.log")
    doomed.start()
    monkeypatch.setenv("REFLECTAGENT_EMBEDDED_URL", doomed.url)
    conf = Settings(
        backends={"embedded": BackendConfig(model="embedded", context_chars=4000, num_retries=0, timeout_s=600)}
    )

    run_ended = threading.Event()

    def kill_after_two_judgments():
        while len(store) < 4 and not run_ended.is_set():
            time.sleep(0.05)
        doomed.stop(grace_s=0)

    killer = threading.Thread(target=kill_after_two_judgments)
    killer.start()
    try:
        with use_cache(store), backend("embedded", conf):
            with pytest.raises(RunInterrupted, match="run the same command again to resume") as stopped:
                judge_pairs(PositionSwapJudge(), pairs, concurrency=1, progress=False)
    finally:
        run_ended.set()
        killer.join()
    saved = len(store)
    assert 4 <= saved < 12, f"stopped after {saved} cached steps by {stopped.value.__cause__!r}"

    monkeypatch.setenv("REFLECTAGENT_EMBEDDED_URL", server.url)  # the same model, served again elsewhere
    with use_cache(store), backend("embedded", conf):
        resumed = judge_pairs(PositionSwapJudge(), pairs, concurrency=1, progress=False)
    assert sum(j.cache_hits for j in resumed) == saved
    assert sum(j.lm_calls for j in resumed) == 12 - saved


LONG_CODE = Pair(
    prompt="Review this code and say what it prints.\n" + "x = [i * 31 % 7 for i in range(10)]; print(x)\n" * 300,
    response_a="It prints a list of ten numbers, 300 times.",
    response_b="It prints nothing.",
)


def test_a_long_pair_is_cut_to_the_context_in_tokens_not_refused(server, cache):
    """No character budget at all: the token budget alone keeps the request inside the 2048-token context."""
    conf = Settings(backends={"embedded": BackendConfig(model="embedded")})
    with backend("embedded", conf) as lm:
        judgment = PositionSwapJudge().judge(LONG_CODE)
        budget = lm.backend.input_budget()
    assert budget.tokens == 2048 - 512 - 4 and budget.chars is None
    assert all(a.parsed for a in judgment.analyses), [a.error for a in judgment.analyses]
    assert any("truncated to fit the context: prompt" in note for note in judgment.notes)


def test_a_request_the_server_refuses_is_a_cached_failed_step(server, cache):
    """A wrong context length lets a too-long request through; the server's refusal is final for that
    request, so it is cached: the re-run makes no call and reports the same failure."""
    conf = Settings(
        backends={
            "wrong": BackendConfig(
                model="hosted_vllm/embedded", api_base=server.url, context_tokens=100_000, max_tokens=600
            )
        }
    )
    with backend("wrong", conf):
        first = PositionSwapJudge().judge(LONG_CODE)
        again = PositionSwapJudge().judge(LONG_CODE)
    assert first.preference is None and first.lm_calls == 2
    assert all(not a.parsed and "Error" in a.error for a in first.analyses)
    assert (
        again.lm_calls == 0
        and again.cache_hits == 2
        and [a.error for a in again.analyses] == [a.error for a in first.analyses]
    )


def test_a_model_name_the_server_does_not_serve_stops_the_step_and_caches_nothing(server, cache, sample_pairs):
    """An unknown model is the endpoint's fault, not the request's: fixed, the same steps must run."""
    conf = Settings(
        backends={"typo": BackendConfig(model="hosted_vllm/no-such-model", api_base=server.url, num_retries=0)}
    )
    from dspy.utils.exceptions import LMUnsupportedModelError

    with backend("typo", conf), pytest.raises(LMUnsupportedModelError, match="no-such-model"):
        PositionSwapJudge().judge(sample_pairs[0])
    assert len(cache) == 0


def test_pointwise_ratings_come_with_expected_scores_from_the_rating_token(server, cache, sample_pairs):
    """Each response rated alone through the real server: a digit under the JSON constraint, and its expected
    value from the token's probabilities decides; the swapped pair costs nothing (the same two ratings)."""
    from reflectagent.programs import named_program

    pair = sample_pairs[0]
    with backend("embedded", settings()):
        judgment = named_program("pointwise-prob").judge(pair)
        swapped = named_program("pointwise-prob").judge(pair.swapped())
    assert [r.response for r in judgment.ratings] == ["A", "B"]
    for rating in judgment.ratings:
        assert rating.parsed, rating.error
        assert rating.rating in range(1, 6) and 1.0 <= rating.score <= 5.0
    score_a, score_b = (r.score for r in judgment.ratings)
    assert judgment.preference == ("A" if score_a > score_b else "B")
    assert judgment.probability_a == pytest.approx(1 / (1 + math.exp(score_b - score_a)))
    assert swapped.lm_calls == 0 and swapped.preference == flip(judgment.preference)
