"""Rewards for trainers with model-free judges (control flow and the numbers' rules); the service's own
rules (capacity, tokens, body limits, bad requests) through an in-process client. The real server tests
run the same against vLLM over loopback."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
from dspy.utils.dummies import DummyLM

from conftest import running_service
from fakes import ScoreJudge
from reflectagent.judge import Judge
from reflectagent.pairs import Pair
from reflectagent.results import Judgment
from reflectagent.rl import NO_VERDICT_REWARD, Rewarder, openrlhf_reward_func, trl_reward, verl_compute_score
from reflectagent.rl.adapters import RewardInputError, as_text


class ProbabilityJudge(Judge):
    """P(A) = sigmoid(a - b) of two numbers; None (no verdict, no probability) when a response says 'none'."""

    def decide(self, pair: Pair) -> Judgment:
        if "none" in (pair.response_a, pair.response_b):
            return Judgment(preference=None, reason="unparsed")
        p = 1 / (1 + math.exp(float(pair.response_b) - float(pair.response_a)))
        return Judgment(preference="A" if p > 0.5 else "B" if p < 0.5 else None, probability_a=p)


LM = DummyLM([])  # never called: these judges need no model


def test_against_a_reference_the_reward_is_the_probability_else_the_vote_else_flagged():
    by_probability = Rewarder(ProbabilityJudge(), lm=LM)
    assert by_probability.against_reference("q", "2", "1").reward == pytest.approx(1 / (1 + math.exp(-1)))
    by_vote = Rewarder(ScoreJudge(), lm=LM)
    assert [by_vote.against_reference("q", a, b).reward for a, b in (("2", "1"), ("1", "2"))] == [1.0, 0.0]
    tie = by_vote.against_reference("q", "1", "1.0")
    assert (tie.reward, tie.verdict, tie.reason) == (NO_VERDICT_REWARD, False, "tie")
    lost = Rewarder(ProbabilityJudge(), lm=LM, no_verdict_reward=-1.0).against_reference("q", "none", "1")
    assert (lost.reward, lost.verdict) == (-1.0, False)


def test_a_group_is_ranked_by_win_rate_or_bradley_terry():
    rewards = Rewarder(ScoreJudge(), lm=LM).group("q", ["1", "3", "2"])
    assert [r.reward for r in rewards] == [0.0, 1.0, 0.5] and all(r.verdict for r in rewards)
    strengths = Rewarder(ScoreJudge(), lm=LM, group="bradley_terry").group("q", ["1", "3", "2"])
    assert strengths[1].reward > strengths[2].reward > strengths[0].reward
    assert sum(r.reward for r in strengths) == pytest.approx(0.0, abs=1e-9)  # log-strengths, mean 0
    alone = Rewarder(ScoreJudge(), lm=LM).group("q", ["1"])
    assert alone[0].verdict is False and alone[0].reason == "alone in its group"


def test_a_batch_mixes_references_and_groups_and_keeps_its_order():
    rewarder = Rewarder(ScoreJudge(), lm=LM)
    out = rewarder.rewards(["p", "q", "p", "r"], ["1", "5", "3", "7"], [None, "4", None, None])
    assert [r.reward for r in out] == [0.0, 1.0, 1.0, NO_VERDICT_REWARD]  # p: a group of 2; q: vs reference; r: alone
    with pytest.raises(ValueError, match="same length"):
        rewarder.rewards(["p"], ["1", "2"])
    assert [r.reward for r in asyncio.run(rewarder.arewards(["p", "p"], ["2", "1"]))] == [1.0, 0.0]


class InFlightJudge(Judge):
    """Async, model-free: the higher number wins; records the most judgments in flight at once."""

    def __init__(self):
        super().__init__()
        self.now = self.most = 0

    async def adecide(self, pair: Pair) -> Judgment:
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.01)
        self.now -= 1
        return Judgment(preference="A" if float(pair.response_a) > float(pair.response_b) else "B")


def test_a_batch_on_the_event_loop_shares_one_limit_over_references_and_groups():
    judge = InFlightJudge()
    rewarder = Rewarder(judge, lm=LM, concurrency=3)
    prompts = ["p"] * 4 + ["q"] * 4 + ["r", "s"]
    responses = ["1", "2", "3", "4", "4", "3", "2", "1", "5", "0"]
    references = [None] * 8 + ["4", "4"]
    out = asyncio.run(
        rewarder.arewards(prompts, responses, references)
    )  # 6 + 6 comparisons in groups, 2 against references
    assert [r.reward for r in out] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3, 0, 1, 0])
    assert judge.most == 3  # all 14 at once would be 14; one at a time, 1
    assert [r.reward for r in rewarder.rewards(prompts, responses, references)] == [r.reward for r in out]


def test_trl_reward_takes_text_or_conversations_and_skips_no_verdict():
    reward = trl_reward(rewarder=Rewarder(ScoreJudge(), lm=LM), reference_column="answer")
    assert reward.__name__ == "reflectagent_ScoreJudge"  # the judge that gives the rewards, not a default name
    assert trl_reward("genrm-prob", lm=LM).__name__ == "reflectagent_genrm_prob"
    prompts = [[{"role": "user", "content": "q"}]] * 3
    completions = [[{"role": "assistant", "content": c}] for c in ("5", "1", "2")]
    assert reward(prompts=prompts, completions=completions, answer=["2", "2", "2"], completion_ids=None) == [
        1.0,
        0.0,
        None,
    ]
    grouped = trl_reward(rewarder=Rewarder(ScoreJudge(), lm=LM))
    assert grouped(prompts=["q", "q"], completions=["1", "2"]) == [0.0, 1.0]
    asynchronous = trl_reward(rewarder=Rewarder(ScoreJudge(), lm=LM), asynchronous=True)
    assert asyncio.iscoroutinefunction(asynchronous)
    assert asyncio.run(asynchronous(prompts=["q", "q"], completions=["1", "2"])) == [0.0, 1.0]
    with pytest.raises(RewardInputError, match="no 'answer' column"):
        reward(prompts=["q"], completions=["1"])
    assert as_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "system: s\n\nuser: u"


def test_verl_compute_score_needs_a_prompt_and_a_reference():
    score = verl_compute_score(rewarder=Rewarder(ScoreJudge(), lm=LM))
    assert score("set", "3", "2", extra_info={"prompt": "q"}) == {"score": 1.0, "abstain": False}
    with pytest.raises(RewardInputError, match="extra_info has no 'prompt'"):
        score("set", "3", "2")
    with pytest.raises(RewardInputError, match="needs a reference answer"):
        score("set", "3", "", extra_info={"prompt": "q"})


def test_openrlhf_reward_func_cuts_the_prompt_off_each_query():
    func = openrlhf_reward_func(rewarder=Rewarder(ScoreJudge(), lm=LM))
    out = func(["q:3", "q:1"], ["q:", "q:"], [])
    assert out["rewards"].tolist() == [1.0, 0.0] and out["extra_logs"]["abstain"].tolist() == [0.0, 0.0]
    with pytest.raises(RewardInputError, match="does not start with its prompt"):
        func(["x3"], ["q:"], [])


def test_a_pair_with_no_verdict_is_an_explicit_abstain_in_every_adapter():
    rewarder = Rewarder(ScoreJudge(), lm=LM)  # equal numbers: no verdict, no probability
    assert trl_reward(rewarder=rewarder)(prompts=["q", "q"], completions=["1", "1.0"]) == [None, None]
    trl = trl_reward(rewarder=rewarder, reference_column="ref")
    assert trl(prompts=["q", "q"], completions=["2", "1"], ref=["1", "1.0"]) == [1.0, None]  # TRL masks None
    verl = verl_compute_score(rewarder=rewarder)
    assert verl("set", "1", "1.0", extra_info={"prompt": "q"}) == {"score": NO_VERDICT_REWARD, "abstain": True}
    out = openrlhf_reward_func(rewarder=rewarder)(["q:1", "q:1.0", "q:3"], ["q:"] * 3, ["1", "1", "1"])
    assert out["rewards"].tolist() == [NO_VERDICT_REWARD, NO_VERDICT_REWARD, 1.0]  # the neutral value, never 0
    assert out["extra_logs"]["abstain"].tolist() == [1.0, 1.0, 0.0]
    # in a group, a response abstains only where none of its comparisons decided anything
    ranking = rewarder.rank("q", ["1", "1.0", "2"])
    assert Rewarder.abstains(ranking) == [False, False, False]
    assert Rewarder.abstains(rewarder.rank("q", ["1", "1.0", "1.00"])) == [True, True, True]
    assert [r.abstain for r in rewarder.group("q", ["1", "1.0", "1.00"])] == [True, True, True]


def test_a_saved_program_is_a_reward_by_its_path(tmp_path):
    from reflectagent.programs import Calibrated, Calibration, GenRM

    path = Calibrated(GenRM(both_orders=True, decision="probability"), Calibration("temperature", 0.5)).save(
        tmp_path / "calibrated.json"
    )
    rewarder = Rewarder(str(path), lm=LM)
    assert type(rewarder.judge).__name__ == "Calibrated" and rewarder.judge.calibration.temperature == 2.0
    assert trl_reward(str(path), lm=LM).__name__ == "reflectagent_calibrated"


# ---- the service's rules, in process ---------------------------------------------------------------------------


class SlowJudge(ScoreJudge):
    release = threading.Event()

    def decide(self, pair):
        self.release.wait(10)
        return super().decide(pair)


def client(judge=None, **options):
    from fastapi.testclient import TestClient

    from reflectagent.rl.service import create_app

    return TestClient(create_app(Rewarder(judge or ScoreJudge(), lm=LM), **options))


def test_bad_requests_get_4xx_with_what_to_fix():
    http = client(max_body_bytes=2000)
    cases = [
        ({"prompts": ["q"]}, 422, "query"),
        ({"query": [], "prompts": []}, 400, "query is empty"),
        ({"query": ["q1", "q2"], "prompts": ["q"]}, 400, "same length"),
        ({"query": ["x1"], "prompts": ["q"]}, 400, "does not start with its prompt"),
        ({"query": ["q" * 3000], "prompts": ["q"]}, 413, "body over 2000 bytes"),
    ]
    for body, status, message in cases:
        answer = http.post("/get_reward", json=body)
        assert answer.status_code == status and message in answer.text, (body, answer.text)
    assert http.post("/v1/rank", json={"prompt": "q", "responses": ["1"]}).status_code == 400
    assert "empty" in http.post("/v1/judge", json={"prompt": " ", "response_a": "1", "response_b": "2"}).text


def test_every_route_flags_an_abstain_beside_its_number():
    http = client()
    tied = http.post("/v1/judge", json={"prompt": "q", "response_a": "1", "response_b": "1.0"}).json()
    decided = http.post("/v1/judge", json={"prompt": "q", "response_a": "2", "response_b": "1"}).json()
    assert (tied["abstain"], tied["preference"], decided["abstain"], decided["decided_by"]) == (True, None, False, None)
    ranked = http.post("/v1/rank", json={"prompt": "q", "responses": ["1", "1.0", "3"]}).json()
    assert ranked["abstain"] == [False, False, False]
    assert http.post("/v1/rank", json={"prompt": "q", "responses": ["1", "1.0"]}).json()["abstain"] == [True, True]
    rewards = http.post(
        "/get_reward", json={"query": ["q:1", "q:3"], "prompts": ["q:"] * 2, "labels": ["1.0", "2"]}
    ).json()
    assert rewards["extra_logs"] == {"abstain": [1.0, 0.0], "no_verdict_reward": NO_VERDICT_REWARD}
    assert rewards["rewards"] == [NO_VERDICT_REWARD, 1.0]


def test_a_token_is_required_when_set_and_health_stays_open():
    http = client(token="s3cret")
    assert http.post("/v1/rank", json={"prompt": "q", "responses": ["1", "2"]}).status_code == 401
    ok = http.post(
        "/v1/rank", json={"prompt": "q", "responses": ["1", "2"]}, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200 and ok.json()["ranks"] == [2, 1]
    assert http.get("/health").status_code == 200


def test_at_capacity_the_service_answers_503_with_retry_after_and_loses_no_accepted_request():
    """Over real HTTP on loopback: one judging, one waiting, the third turned away at once."""
    import httpx

    SlowJudge.release.clear()
    body = {"prompt": "q", "response_a": "2", "response_b": "1"}
    with running_service(Rewarder(SlowJudge(), lm=LM), max_concurrency=1, max_queue=1) as url:
        answers = []
        threads = [
            threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/judge", json=body, timeout=30)))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = httpx.post(f"{url}/v1/judge", json=body, timeout=30)
        SlowJudge.release.set()
        for thread in threads:
            thread.join()
        metrics = httpx.get(f"{url}/metrics").text
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert [a.status_code for a in answers] == [200, 200] and all(a.json()["preference"] == "A" for a in answers)
    assert 'reflectagent_requests_total{route="/v1/judge",status="503"} 1.0' in metrics
    assert 'reflectagent_requests_total{route="/v1/judge",status="200"} 2.0' in metrics


def test_pairs_that_cannot_be_judged_get_the_flagged_neutral_reward_not_an_error():
    rewarder = Rewarder(ScoreJudge(), lm=LM)
    empty = rewarder.against_reference("q", "", " ")
    assert (empty.reward, empty.verdict) == (NO_VERDICT_REWARD, False) and "both responses are empty" in empty.reason
    assert [r.verdict for r in rewarder.group(" ", ["1", "2"])] == [False, False]  # an empty prompt
    assert Rewarder(ScoreJudge(), lm=LM, group="bradley_terry").group("q", ["1"])[0].reward == 0.0  # BT's mean
    with pytest.raises(ValueError, match="over max_group"):
        Rewarder(ScoreJudge(), lm=LM, max_group=3).group("q", ["1", "2", "3", "4"])


def test_unknown_paths_share_one_metric_label_and_chunked_bodies_are_refused():
    http = client(max_body_bytes=2000)
    for n in range(3):
        http.get(f"/nothing-{n}")
    assert 'route="other",status="404"} 3.0' in http.get("/metrics").text
    chunked = http.post(
        "/get_reward",
        content=iter([b'{"query": ["q1"], ', b'"prompts": ["q"]}']),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 411 and "Content-Length" in chunked.text
    big = http.post("/v1/rank", json={"prompt": "q", "responses": [str(i) for i in range(65)]})
    assert big.status_code == 413 and "max_group" in big.text


def test_a_request_over_its_time_gets_504_and_its_place_is_freed_when_the_work_ends():
    import httpx

    SlowJudge.release.clear()
    body = {"prompt": "q", "response_a": "2", "response_b": "1"}
    with running_service(Rewarder(SlowJudge(), lm=LM), max_concurrency=1, max_queue=0, timeout_s=0.3) as url:
        late = httpx.post(f"{url}/v1/judge", json=body, timeout=30)
        busy = httpx.post(f"{url}/v1/judge", json=body, timeout=30)  # the timed-out work still holds the one place
        SlowJudge.release.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        again = httpx.post(f"{url}/v1/judge", json=body, timeout=30)
    assert late.status_code == 504 and "goes on into the cache" in late.text
    assert busy.status_code == 503 and again.status_code == 200 and again.json()["preference"] == "A"


def test_a_batch_counts_its_judgments_before_judging_and_a_big_group_is_its_own_error():
    from reflectagent.rl.rewards import GroupTooLarge

    count = Rewarder(ScoreJudge(), lm=LM, round_robin_up_to=64).judgments_needed
    assert count(["q"] * 64 + ["p"] * 64) == 2 * 2016 and count(["q", "q", "p"], ["r", None, None]) == 1
    assert count(["q"] * 3, ["r", "", None]) == 1 + 1  # an empty reference is no reference: q's two form a group
    assert Rewarder(ScoreJudge(), lm=LM).judgments_needed(["q"] * 64) == 63  # over round_robin_up_to: a tournament
    with pytest.raises(GroupTooLarge, match="over max_group"):
        Rewarder(ScoreJudge(), lm=LM, max_group=3).rewards(["q"] * 4, ["1", "2", "3", "4"])
