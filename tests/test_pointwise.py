"""PointwiseJudge's control flow with a fake LM: each response rated alone, the higher score wins, ties and
unparsed ratings give no verdict. The real server tests run it against vLLM."""

import json

import pytest
import dspy

from fakes import BAD, GOOD, PAIR, fake
from reflectagent.modules import expected_rating
from reflectagent.programs import PointwiseJudge, load_program, named_program
from reflectagent.programs.pointwise import preference_probability
from reflectagent.results import Judgment


def rater(good: str, bad: str):
    """Rates GOOD and BAD as given, whichever position they hold in the pair."""
    return fake({f"[[ ## response ## ]]\n{GOOD}": {"rating": good}, f"[[ ## response ## ]]\n{BAD}": {"rating": bad}})


@pytest.mark.parametrize(
    ("good", "bad", "swapped", "want"),
    [
        ("5", "2", False, "A"),
        ("5", "2", True, "B"),
        ("1", "4", False, "B"),
        ("1", "4", True, "A"),
        ("3", "3", False, None),
    ],
)
def test_the_higher_generated_rating_wins_and_a_tie_is_no_verdict(cache, good, bad, swapped, want):
    with dspy.context(lm=rater(good, bad)):
        judgment = named_program("pointwise").judge(PAIR.swapped() if swapped else PAIR)
    assert judgment.preference == want and judgment.reason == (None if want else "tied ratings")
    first, second = (bad, good) if swapped else (good, bad)
    assert [(r.response, r.rating) for r in judgment.ratings] == [("A", int(first)), ("B", int(second))]
    assert judgment.lm_calls == 2 and len(judgment.steps) == 2


def test_an_unparsed_rating_is_no_verdict_never_a_guess(cache):
    with dspy.context(lm=rater("7", "4")):  # 7 is not a rating
        judgment = PointwiseJudge(decision="vote").judge(PAIR)
    assert judgment.preference is None and judgment.reason == "unparsed"
    assert [r.parsed for r in judgment.ratings] == [False, True]


def test_without_log_probs_the_probability_rule_gives_no_verdict(cache):
    with dspy.context(lm=rater("5", "1")):
        judgment = PointwiseJudge().judge(PAIR)
    assert judgment.preference is None and judgment.reason == "no verdict probabilities"


def test_a_response_is_rated_once_whatever_pair_or_order_it_is_in(cache):
    with dspy.context(lm=rater("5", "1")):
        first = PointwiseJudge(decision="vote").judge(PAIR)
        swapped = PointwiseJudge(decision="vote").judge(PAIR.swapped())
    assert first.lm_calls == 2 and swapped.lm_calls == 0 and swapped.cache_hits == 2
    assert (first.preference, swapped.preference) == ("A", "B")


def test_expected_rating_and_preference_probability():
    assert expected_rating({"1": 0.0, "2": 0.0, "3": 0.5, "4": 0.5, "5": 0.0}) == pytest.approx(3.5)
    assert expected_rating(None) is None
    assert preference_probability(4.0, 4.0) == 0.5
    assert preference_probability(4.5, 3.5) == pytest.approx(0.7311, abs=1e-4)
    assert preference_probability(3.0, 4.0) < 0.5


def test_saves_and_loads_as_itself(tmp_path):
    loaded = load_program(PointwiseJudge(decision="vote").save(tmp_path / "p.json"))
    assert isinstance(loaded, PointwiseJudge) and loaded.options == {"decision": "vote"}


def test_ratings_survive_a_round_trip_through_json(cache):
    with dspy.context(lm=rater("4", "2")):
        judgment = PointwiseJudge(decision="vote").judge(PAIR)
    again = Judgment.from_dict(json.loads(json.dumps(judgment.to_dict())))
    assert again.ratings == judgment.ratings and again.preference == judgment.preference == "A"


def test_assess_prob_writes_an_assessment_before_each_rating(cache, tmp_path):
    lm = fake(
        {
            f"[[ ## response ## ]]\n{GOOD}": {"assessment": "names the right capital", "rating": "5"},
            f"[[ ## response ## ]]\n{BAD}": {"assessment": "Berlin is wrong", "rating": "1"},
        }
    )
    with dspy.context(lm=lm):
        judgment = PointwiseJudge(decision="vote", rationale=True).judge(PAIR)
    assert [(r.response, r.text) for r in judgment.ratings] == [
        ("A", "names the right capital"),
        ("B", "Berlin is wrong"),
    ]
    assert judgment.preference == "A"
    assert load_program(PointwiseJudge(rationale=True).save(tmp_path / "p.json")).options["rationale"] is True
