"""A program that decides by probability needs the verdict token's log-probabilities: on a backend that does not
ask for them it stops before any call, and on a server that ignores the request it stops after the first judgment,
each time saying what to do, never giving no verdict pair after pair. Vote programs judge on the same backends; a
batch run (eval) stops on it with the message. The fake engine stands in for the servers."""

import json
import logging

import dspy
import pytest
from typer.testing import CliRunner

from fakes import GOOD, PAIR, ThreadEngine, fake, fake_api_backend, fake_engine
from reflectagent.calling.backends import resolve_backend
from reflectagent.calling.cache import JudgmentCache, use_cache
from reflectagent.calling.config import BackendConfig, Settings
from reflectagent.cli import app
from reflectagent.eval.runner import run_eval
from reflectagent.judging import decisions
from reflectagent.judging.decisions import LogprobsUnavailable
from reflectagent.judging.runs import RunInterrupted, judge_pairs
from reflectagent.programs import Ensemble, PointwiseJudge, named_program
from reflectagent.records.pairs import Pair

PAIRS = [Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}", label="A") for i in range(3)]
PROBABILITY = ["direct-prob", "genrm-prob", "reflectrm-prob", "reflectrm-adaptive-prob", "pointwise-prob", "swap-prob"]


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")


@pytest.fixture
def engine():
    with ThreadEngine() as running:
        yield running


@pytest.fixture
def ignoring(monkeypatch):
    """The fake engine as a server that ignores ``logprobs``: the same answers, never a log-probability."""
    answer = fake_engine.completion
    monkeypatch.setattr(fake_engine, "completion", lambda model, text, top_logprobs=None: answer(model, text))
    with ThreadEngine() as running:
        yield running


def program(name: str):
    if name == "swap-prob":  # the core's judge, by probability
        from reflectagent.judging.position_swap import PositionSwapJudge

        return PositionSwapJudge(decision="probability")
    return named_program(name)


def hosted_api(engine, **options) -> Settings:
    return Settings(backends={"api": fake_api_backend(engine.api_base).model_copy(update=options)})


def vllm(engine) -> Settings:
    """A vLLM-compatible server: log-probs asked for by default."""
    return Settings(
        backends={"vllm": BackendConfig(model="hosted_vllm/fake", api_base=engine.api_base, num_retries=0, seed=7)}
    )


@pytest.mark.parametrize("name", [*PROBABILITY, "escalating-prob"])
def test_a_probability_program_on_a_backend_with_logprobs_off_stops_before_any_call(engine, tmp_path, name):
    with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("api", hosted_api(engine))):
        with pytest.raises(LogprobsUnavailable) as raised:
            program(name).judge(PAIR)
    said = str(raised.value)
    assert "decides by the verdict token's log-probabilities, but backend 'api' does not ask for them" in said
    assert "logprobs = false in [backends.api]" in said and "set logprobs = true in [backends.api]" in said
    assert "a vote program such as genrm" in said
    assert engine.chat_requests == 0  # said before a single call, not after a run of no verdicts


def test_a_backend_with_logprobs_left_unset_is_told_it_is_off_by_default(engine, tmp_path):
    settings = hosted_api(engine, logprobs=None)  # a hosted API: off unless the config says so
    with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("api", settings)):
        with pytest.raises(LogprobsUnavailable, match="logprobs is off by default for a backend that is not vLLM"):
            named_program("genrm-prob").judge(PAIR)
        with pytest.raises(LogprobsUnavailable):  # identical responses too: the configuration is wrong either way
            named_program("genrm-prob").judge(Pair(prompt="q", response_a="same", response_b="same"))
    assert engine.chat_requests == 0


@pytest.mark.parametrize("name", ["genrm", "genrm-both", "reflectrm", "swap"])
def test_a_vote_program_judges_on_the_same_backend(engine, tmp_path, name):
    with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("api", hosted_api(engine))):
        judged = judge_pairs(named_program(name), PAIRS, progress=False)
    assert [j.preference for j in judged] == ["A"] * len(PAIRS) and engine.chat_requests > 0


def test_a_member_on_a_backend_without_logprobs_stops_a_probability_ensemble(engine, tmp_path):
    lm = resolve_backend("api", hosted_api(engine))
    ensemble = Ensemble([(named_program("genrm-both"), lm), (named_program("genrm"), lm)], decision="probability")
    with use_cache(JudgmentCache(tmp_path / "cache")), pytest.raises(LogprobsUnavailable, match="backend 'api'"):
        ensemble.judge(PAIR)
    assert engine.chat_requests == 0
    vote = Ensemble([(named_program("genrm-both"), lm), (named_program("genrm"), lm)])
    with use_cache(JudgmentCache(tmp_path / "cache")):
        assert vote.judge(PAIRS[0]).preference == "A"


def test_a_server_that_ignores_the_request_for_logprobs_stops_the_run_even_from_the_cache(ignoring, tmp_path):
    lm = resolve_backend("vllm", vllm(ignoring))
    with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=lm):
        with pytest.raises(LogprobsUnavailable) as raised:
            named_program("genrm-prob").judge(PAIRS[0])
        asked = ignoring.requests[0]
        assert asked["logprobs"] is True and asked["top_logprobs"] == 5  # asked, and answered without them
        said = str(raised.value)
        assert "backend 'vllm' was asked for log-probabilities, but its server returned a parsed verdict" in said
        assert "no log-probabilities for its verdict token: it ignores the request (some engines do)" in said
        assert "GenRM (decision='probability')" in said and "set logprobs = false in [backends.vllm]" in said
        assert "judgment cache" not in said
        calls = ignoring.chat_requests
        # again: every step is in the cache, kept as the server answered; it stops the same way, and says so
        with pytest.raises(LogprobsUnavailable, match="this verdict came from the judgment cache") as again:
            named_program("genrm-prob").judge(PAIRS[0])
        assert "--no-cache or another cache_tag in [backends.vllm]" in str(again.value)
        assert ignoring.chat_requests == calls
        # the same backend, by vote: every pair judged, from the steps it already has and new ones
        judged = judge_pairs(named_program("genrm-both"), PAIRS, progress=False)
    assert [j.preference for j in judged] == ["A"] * len(PAIRS)


def test_a_server_that_sends_logprobs_is_judged_by_probability(engine, tmp_path):
    with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("vllm", vllm(engine))):
        judged = judge_pairs(named_program("genrm-prob"), PAIRS, progress=False)
    assert [j.preference for j in judged] == ["A"] * len(PAIRS) and all(j.probability_a > 0.5 for j in judged)


def test_eval_stops_on_it_with_the_message_not_with_a_failure_per_pair(engine, tmp_path):
    settings = hosted_api(engine)
    with use_cache(JudgmentCache(tmp_path / "cache")), pytest.raises(RunInterrupted) as raised:
        run_eval(PAIRS, ["genrm", "genrm-prob"], ["api"], settings=settings, progress=False)
    assert isinstance(raised.value.cause, LogprobsUnavailable)
    said = str(raised.value)
    assert said.startswith("stopped after ") and "LogprobsUnavailable: GenRM (decision='probability')" in said
    assert "set logprobs = true in [backends.api]" in said and "the same command would stop here again" in said


def test_the_eval_command_says_it_in_one_error(engine, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"p{i}",
                    "prompt": p.prompt,
                    "response_a": p.response_a,
                    "response_b": p.response_b,
                    "label": "A",
                }
            )
            + "\n"
            for i, p in enumerate(PAIRS)
        )
    )
    config = tmp_path / "c.toml"
    config.write_text(
        f'[backends.api]\nmodel = "openai/fake"\napi_base = "{engine.api_base}"\napi_key_env = "FAKE_KEY"\n'
        "constrained = false\nlogprobs = false\nnum_retries = 0\n"
    )
    args = ["eval", "--data", data, "--programs", "genrm-prob", "--backends", "api", "--config", config]
    result = CliRunner().invoke(app, [*map(str, args), "-o", str(tmp_path / "report"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "LogprobsUnavailable" in errors[0] and "backend 'api' does not ask" in errors[0]
    assert not (tmp_path / "report" / "report.json").exists() and engine.chat_requests == 0


def test_a_plain_lm_asked_for_logprobs_that_gives_none_stops(cache):
    """A dspy LM that is not a configured backend, created with logprobs=True: a parsed rating without them stops
    the pointwise program as it stops GenRM; an unparsed one is only no verdict."""
    lm = fake({f"[[ ## response ## ]]\n{GOOD}": {"rating": "5"}, "[[ ## response ## ]]": {"rating": "2"}})
    lm.kwargs["logprobs"] = True
    with dspy.context(lm=lm), pytest.raises(LogprobsUnavailable, match=r"the LM 'dummy' was asked .*logprobs=True"):
        PointwiseJudge().judge(PAIR)
    unparsed = fake({"": {"rating": "9"}})  # not a rating: unparsed, and so no verdict, with a reason
    unparsed.kwargs["logprobs"] = True
    with use_cache(JudgmentCache(enabled=False)), dspy.context(lm=unparsed):  # the same key as lm's steps
        judged = PointwiseJudge().judge(PAIR)
    assert judged.preference is None and judged.reason == "unparsed"
    with dspy.context(lm=lm):
        assert PointwiseJudge(decision="vote").judge(PAIR).preference == "A"


def test_a_plain_lm_never_asked_is_told_of_in_the_log_and_gives_no_verdict(cache, caplog, monkeypatch):
    """reflectagent asks only its backends for log-probs: a plain dspy LM (here DSPy's DummyLM, the tests' fake) is
    not refused, since it is not reflectagent's to configure; the log says why its verdicts are missing."""
    monkeypatch.setattr(decisions, "_told", set())  # told once per process: this test must not come second
    lm = fake({"": {"analysis": "A is right", "preference": "A"}})
    with caplog.at_level(logging.WARNING, logger="reflectagent.judging.decisions"), dspy.context(lm=lm):
        judged = named_program("genrm-prob").judge(PAIR)
    assert judged.preference is None and judged.reason == "no verdict probabilities"
    assert any("is not a reflectagent backend and is not asked for them" in r.getMessage() for r in caplog.records)


def test_a_reward_service_on_a_backend_without_logprobs_is_refused_at_start(engine):
    """The reward service would otherwise answer every request with an error; a judge inside a ladder counts too."""
    from reflectagent.rl.rewards import Rewarder

    lm = resolve_backend("api", hosted_api(engine))
    for judge in ("genrm-prob", "escalating-prob"):
        with pytest.raises(LogprobsUnavailable, match="backend 'api' does not ask for them"):
            Rewarder(judge, lm=lm)
    Rewarder("genrm", lm=lm)  # a vote program is fine there
    assert engine.chat_requests == 0
