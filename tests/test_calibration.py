"""Calibration's maths and control flow, model-free: the fits recover known maps, a calibrated program rescales
P(A) and saves the map with where it was fitted, a test split is refused. The real server tests are in
test_calibration_escalation_server.py."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from dspy.utils.dummies import DummyLM

from reflectagent.judge import Judge
from reflectagent.pairs import Pair
from reflectagent.programs import Calibrated, Calibration, GenRM, calibrate
from reflectagent.programs.calibration import fit_calibration, log_loss, logit, sigmoid
from reflectagent.results import Judgment


class Overconfident(Judge):
    """P(A) = sigmoid(3 * (a - b)) of two numbers, though the truth is sigmoid(a - b): three times too sure."""

    def __init__(self, decision: str = "probability"):
        super().__init__(decision=decision)

    def decide(self, pair: Pair) -> Judgment:
        p = float(sigmoid(3 * (float(pair.response_a) - float(pair.response_b))))
        return Judgment(preference="A" if p > 0.5 else "B" if p < 0.5 else None, probability_a=p)


def synthetic(n, slope, intercept, seed=0):
    """Judge P(A) spread over (0, 1), and outcomes drawn from sigmoid(slope * logit + intercept)."""
    rng = np.random.default_rng(seed)
    p = sigmoid(rng.normal(0, 2, n))
    return p, rng.random(n) < sigmoid(slope * logit(p) + intercept)


def test_temperature_and_platt_recover_the_map_that_made_the_outcomes():
    p, y = synthetic(20000, 1 / 3, 0.0)
    fitted = fit_calibration(p, y, "temperature")
    assert fitted.intercept == 0.0 and fitted.temperature == pytest.approx(3.0, rel=0.05)
    assert fitted.log_loss_after < fitted.log_loss_before  # an overconfident judge's loss falls
    p, y = synthetic(20000, 0.5, 0.8, seed=1)
    platt = fit_calibration(p, y, "platt")
    assert platt.slope == pytest.approx(0.5, abs=0.05) and platt.intercept == pytest.approx(0.8, abs=0.08)
    assert log_loss([platt.apply(x) for x in p], y) < log_loss(p, y)


def test_temperature_never_moves_a_verdict_and_the_slope_stays_positive():
    p, y = synthetic(2000, 1 / 3, 0.0)
    fitted = fit_calibration(p, y, "temperature")
    assert all((fitted.apply(x) > 0.5) == (x > 0.5) for x in p)
    assert fitted.apply(0.5) == pytest.approx(0.5)
    reversed_judge = fit_calibration(p, ~y, "temperature")  # a judge that is always wrong is not flipped round
    assert reversed_judge.slope == pytest.approx(1e-3) and reversed_judge.apply(0.9) > 0.5
    identity = fit_calibration([0.5, 0.5], [True, False])
    assert (identity.slope, identity.intercept) == (1.0, 0.0)
    with pytest.raises(ValueError, match="method must be"):
        fit_calibration(p, y, "isotonic")


def test_a_calibrated_program_rescales_p_a_its_verdict_follows_and_it_saves_with_where_it_was_fitted(tmp_path):
    lm = DummyLM([])
    pairs = [
        Pair(prompt="q", response_a=str(a), response_b=str(b), label="A" if a > b else "B")
        for a, b in [(1, 0), (0, 1), (2, 1.5), (0.2, 0.9), (3, 2), (1, 1.3)]
    ]
    with pytest.raises(ValueError, match="never fit on a test split"):
        calibrate(Overconfident(), pairs, split="test")
    import dspy

    with dspy.context(lm=lm):
        judge = calibrate(Overconfident(), pairs, "temperature", split="dev", data=["pairs.jsonl"])
        raw = Overconfident().judge(Pair(prompt="q", response_a="1", response_b="0.5"))
        cooled = judge.judge(Pair(prompt="q", response_a="1", response_b="0.5"))
    # all 12 judgments right: plain maximum likelihood would fit an infinitely sure judge; Platt's smoothed targets
    # (7/8 and 1/8 here) keep it finite, and below the raw judge's 0.95-and-surer confidence
    assert 0.1 < judge.calibration.slope < 1
    assert judge.calibration.fitted_on["split"] == "dev" and judge.calibration.fitted_on["pairs"] == 6
    assert judge.calibration.fitted_on["judgments"] == 12 and judge.calibration.fitted_on["data"] == ["pairs.jsonl"]
    assert cooled.probability_a == pytest.approx(judge.calibration.apply(raw.probability_a))
    assert cooled.preference == raw.preference == "A" and "calibrated P(A)" in cooled.notes[-1]
    path = judge.save(tmp_path / "calibrated.json")
    saved = json.loads(path.read_text())
    assert saved["options"]["calibration"]["fitted_on"]["pairs_sha256"] == judge.calibration.fitted_on["pairs_sha256"]
    # a Platt map with an intercept can move a verdict near 0.5
    shifted = Calibrated(Overconfident(), Calibration("platt", 1.0, -0.5))
    with dspy.context(lm=lm):
        moved = shifted.judge(Pair(prompt="q", response_a="1.05", response_b="1"))
    assert moved.probability_a < 0.5 and moved.preference == "B"


def test_a_saved_calibrated_genrm_loads_in_a_fresh_process_with_its_map_and_demos(tmp_path):
    genrm = GenRM(both_orders=True, decision="probability")
    genrm.analyzer.predict.demos = [
        {"prompt": "p", "response_a": "a", "response_b": "b", "analysis": "x", "preference": "A"}
    ]
    path = Calibrated(genrm, Calibration("temperature", 0.5, fitted_on={"split": "dev", "pairs": 3})).save(
        tmp_path / "c.json"
    )
    code = f"""
from reflectagent.programs import load_program
p = load_program({str(path)!r})
print(type(p).__name__, type(p.inner).__name__, p.calibration.temperature, p.calibration.fitted_on["split"],
      len(p.inner.analyzer.predict.demos), p.inner.options["decision"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["Calibrated", "GenRM", "2.0", "dev", "1", "probability"]


def test_only_a_program_that_decides_by_probability_is_calibrated():
    with pytest.raises(ValueError, match="does not decide by P"):
        Calibrated(GenRM(both_orders=True), Calibration("temperature", 1.0))
    with pytest.raises(ValueError, match="does not decide by P"):
        Calibrated(Overconfident(decision="vote"), Calibration("temperature", 1.0))


def test_a_judgment_without_p_a_comes_back_as_it_was():
    class Silent(Overconfident):
        def decide(self, pair):
            return Judgment(preference=None, reason="unparsed")

    judged = Calibrated(Silent(), Calibration("temperature", 2.0)).judge(
        Pair(prompt="q", response_a="1", response_b="2")
    )
    assert judged.preference is None and judged.reason == "unparsed" and judged.probability_a is None
    assert not math.isnan(Calibration("platt", 1.0, 0.0).apply(1.0))  # a sure P(A) stays finite
