"""The judge's rolling gauges (``reflectagent.rl.monitors``): their rules on made-up judgments, and a stream through
the service where length alone comes to decide, the length gauge moving with it (model-free judges)."""

from __future__ import annotations

import math
import random

import pytest
from dspy.utils.dummies import DummyLM
from prometheus_client import CollectorRegistry

from reflectagent.judge import Judge
from reflectagent.pairs import Pair
from reflectagent.results import Analysis, Judgment
from reflectagent.rl import Rewarder
from reflectagent.rl.monitors import Monitor, order_flip


def analysis(preference, swapped, probability=None):
    return Analysis(
        text="", preference=preference, swapped=swapped, parsed=preference is not None, raw="", probability=probability
    )


def both_orders(first, second, probability_a=None, preference="first"):
    preference = first if preference == "first" else preference
    return Judgment(
        preference=preference, analyses=(analysis(first, False), analysis(second, True)), probability_a=probability_a
    )


def test_each_rate_counts_what_it_says_over_the_window():
    monitor = Monitor("j", window=4, registry=CollectorRegistry())
    monitor.judged(
        [
            both_orders("A", "A", 0.9),
            both_orders("A", "B", None, None),
            Judgment(preference=None, probability_a=0.5),
            Judgment(preference=None, reason="tie"),
        ]
    )
    now = monitor.reading()
    assert now.order_flip_rate == 0.5  # of the two that saw both orders, one leans apart
    assert (
        now.tie_rate == 0.5 and now.abstain_rate == 0.5
    )  # a P(A) of 0.5 and a tie word; the split vote and the tie word
    assert now.mean_margin == pytest.approx((0.4 + 0 + 0 + 0) / 4) and now.judgments == 4
    assert order_flip(Judgment(preference="A", analyses=(analysis("A", False),))) is None  # one order: not observed
    monitor.judged([both_orders("B", "B")] * 4)  # the window rolls: only these four are left
    assert (monitor.reading().order_flip_rate, monitor.reading().mean_margin) == (0.0, 0.5)


def test_length_gauges_are_pearson_r_and_the_slope_per_thousand_characters():
    monitor = Monitor("j", registry=CollectorRegistry())
    assert math.isnan(monitor.reading().length_correlation)  # nothing yet: NaN, not 0
    monitor.scored([100, 200, 300, 400], [0.1, 0.2, 0.3, 0.4])
    assert monitor.reading().length_correlation == pytest.approx(
        1.0
    ) and monitor.reading().length_slope == pytest.approx(1.0)
    with pytest.raises(ValueError, match="window"):
        Monitor("j", window=2)


class SwitchingJudge(Judge):
    """P(A) from the number each response starts with, until ``by_length``: then the longer response wins."""

    by_length = False

    def decide(self, pair: Pair) -> Judgment:
        a, b = pair.response_a, pair.response_b
        delta = (len(a) - len(b)) / 20 if self.by_length else float(a.split()[0]) - float(b.split()[0])
        p = 1 / (1 + math.exp(-delta))
        return Judgment(preference="A" if p > 0.5 else "B" if p < 0.5 else None, probability_a=p)


def gauge(metrics: str, name: str) -> float:
    line = next(
        line for line in metrics.splitlines() if line.startswith(f'reflectagent_judge_{name}{{judge="switch"}}')
    )
    return float(line.split()[-1])


def test_the_length_gauge_rises_when_length_alone_decides():
    from fastapi.testclient import TestClient

    from reflectagent.rl.service import create_app

    judge, draw = SwitchingJudge(), random.Random(0)
    http = TestClient(create_app(Rewarder(judge, lm=DummyLM([])), judge_name="switch", monitor_window=60))

    def groups(n):
        for _ in range(n):  # four responses: a quality number, then padding of a length that has nothing to do with it
            responses = [f"{draw.randint(0, 9)} " + "x" * draw.randint(0, 400) for _ in range(4)]
            assert http.post("/v1/rank", json={"prompt": "q", "responses": responses}).status_code == 200

    groups(15)
    before = http.get("/metrics").text
    judge.by_length = True
    groups(15)
    after = http.get("/metrics").text
    assert abs(gauge(before, "length_correlation")) < 0.4 and gauge(after, "length_correlation") > 0.7
    assert gauge(after, "length_slope") > 1.0 and gauge(after, "window_scores") == 60
    assert gauge(after, "abstain_rate") == 0.0 and 0.0 < gauge(after, "mean_margin") <= 0.5
