"""A group of completions judged together (``reflectagent.rl.groups``): copies judged once, every pair shown in one
order, round robin or tournament by size; counted against judging every two of the N (model-free judges)."""

from __future__ import annotations

import pytest
from dspy.utils.dummies import DummyLM

from fakes import ScoreJudge
from reflectagent.judge import Judge
from reflectagent.pairs import Pair
from reflectagent.programs.ranking import rank
from reflectagent.results import Analysis, Judgment, Usage
from reflectagent.rl import Rewarder
from reflectagent.rl.groups import distinct, judgments_needed

LM = DummyLM([])


class CountingJudge(Judge):
    """The higher number wins, one "LM call" a judgment (an analysis carrying its usage); every pair as shown is kept."""

    def __init__(self):
        super().__init__()
        self.shown: list[tuple[str, str]] = []

    def decide(self, pair: Pair) -> Judgment:
        self.shown.append((pair.response_a, pair.response_b))
        a, b = float(pair.response_a), float(pair.response_b)
        preference = "A" if a > b else "B" if a < b else None
        step = Analysis(text="", preference=preference, swapped=False, parsed=True, raw="", usage=Usage(lm_calls=1))
        return Judgment(preference=preference, analyses=(step,), reason=None if preference else "tie")


def test_identical_completions_are_judged_once_and_share_their_first_copys_reward():
    group = ["1", "3", "1", "2", "3", "1"]
    judge = CountingJudge()
    rewards = Rewarder(judge, lm=LM).group("q", group)
    assert len(judge.shown) == 3  # the three distinct texts, every two once; naive pairwise judges 15 pairs
    assert [r.reward for r in rewards] == [0.0, 1.0, 0.0, 0.5, 1.0, 0.0] and not any(r.abstain for r in rewards)
    naive = CountingJudge()
    rank(naive, "q", group)
    assert len(naive.shown) == 15 - 4  # of its 15 pairs, the 4 of two copies are refused before the judge
    # a batch's rewards carry each judgment once, with its cost: they add up to what the group took
    assert sum(len(r.judgments) for r in rewards) == 3 and sum(r.usage.lm_calls for r in rewards) == 3


def test_every_pair_is_shown_in_one_order_whatever_the_groups_order():
    first, second = CountingJudge(), CountingJudge()
    Rewarder(first, lm=LM).group("q", ["1", "2", "3", "4"])
    Rewarder(second, lm=LM).group("q", ["4", "2", "3", "1", "2"])
    assert (
        sorted(first.shown) == sorted(second.shown) and len(first.shown) == 6
    )  # the judgment cache answers them again
    order, same_as = distinct(["b", "a", "b"])
    assert same_as == (0, 1, 0) and sorted(order) == [0, 1]


def test_a_small_group_is_a_round_robin_and_a_large_one_a_tournament():
    judge = CountingJudge()
    rewarder = Rewarder(judge, lm=LM, round_robin_up_to=4)
    small = rewarder.rank("q", ["1", "2", "3", "4"])
    assert (small.method, len(small.comparisons)) == ("round_robin", 6)
    large = rewarder.rank("q", [str(i) for i in range(9)] + ["8"])  # ten responses, nine distinct
    assert (large.method, len(large.comparisons)) == ("tournament", 8) and set(large.order[:2]) == {8, 9}
    assert large.win_rate[8] == large.win_rate[9] == 1.0  # the champion and its copy
    assert rewarder.judgments_needed(["q"] * 10, responses=[str(i) for i in range(9)] + ["8"]) == 8
    assert judgments_needed(["a", "b", "a"]) == 1 and judgments_needed(["a", "a"]) == 0


def test_a_group_of_one_text_abstains_without_judging():
    judge = CountingJudge()
    rewards = Rewarder(judge, lm=LM).group("q", ["2", "2", "2"])
    assert judge.shown == [] and all(r.abstain for r in rewards)
    assert rewards[0].reason == "identical to every other response of its group"
    assert Rewarder.abstains(Rewarder(judge, lm=LM).rank("q", ["2", "2"])) == [True, True]


def test_a_copy_abstains_with_its_first_copy_and_the_rank_route_says_so():
    from fastapi.testclient import TestClient

    from reflectagent.rl.service import create_app

    ranking = Rewarder(ScoreJudge(), lm=LM).rank(
        "q", ["1", "1.0", "1", "1.00"]
    )  # equal numbers: every comparison a tie
    assert Rewarder.abstains(ranking) == [True] * 4 and ranking.same_as == (0, 1, 0, 3)
    http = TestClient(create_app(Rewarder(CountingJudge(), lm=LM)))
    ranked = http.post("/v1/rank", json={"prompt": "q", "responses": ["1", "3", "1", "2"]}).json()
    assert ranked["scores"] == pytest.approx([0.0, 1.0, 0.0, 0.5]) and ranked["comparisons"] == 3
    assert (
        ranked["abstain"] == [False] * 4
        and ranked["ranks"][1] == 1
        and sorted(ranked["ranks"][i] for i in (0, 2)) == [3, 4]
    )
