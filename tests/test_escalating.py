"""EscalatingJudge's control flow on scripted stages and fake LMs: when it climbs, who decides, what it costs,
the budget, replays at lower thresholds, the threshold chosen on dev pairs, saving. The real server test is in
test_calibration_escalation_server.py."""

import json
import subprocess
import sys

import dspy
import pytest

from fakes import PAIR, fake
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import ConfigError
from reflectagent.judge import Judge
from reflectagent.pairs import Pair
from reflectagent.programs import Calibrated, Calibration, EscalatingJudge, GenRM, choose_threshold, named_program
from reflectagent.programs.escalating import doubt, ladder, orders_disagree
from reflectagent.results import Analysis, Judgment, Usage


class Scripted(Judge):
    """A model-free stage: P(response "x" better) per prompt from a table (None: no verdict), whichever side "x" is
    on; each judgment holds one step that cost one call."""

    def __init__(self, table: dict):
        super().__init__(table=table)

    def decide(self, pair: Pair) -> Judgment:
        p = self.options["table"].get(pair.prompt)
        if p is None:
            return Judgment(preference=None, reason="unparsed")
        p = p if pair.response_a == "x" else 1 - p
        preference = "A" if p > 0.5 else "B" if p < 0.5 else None
        step = Analysis(
            text="", preference=preference, swapped=False, parsed=True, raw=f"stage {id(self)}", usage=Usage(lm_calls=1)
        )
        return Judgment(
            preference=preference, probability_a=p, analyses=(step,), reason="tied probability" if p == 0.5 else None
        )


def stages(*tables):
    return EscalatingJudge(
        [(Scripted(t), None) for t in tables], [f"s{k + 1}" for k in range(len(tables))], threshold=0.1
    )


def ask(judge, prompt):
    return judge.judge(Pair(prompt=prompt, response_a="x", response_b="y"))


def test_it_climbs_only_while_in_doubt_and_the_last_verdict_decides():
    judge = stages({"easy": 0.9, "close": 0.55, "lost": None}, {"close": 0.2, "lost": 0.56}, {"lost": None})
    easy, close, lost = ask(judge, "easy"), ask(judge, "close"), ask(judge, "lost")
    assert (easy.preference, easy.decided_by, len(easy.parts)) == ("A", "s1", 1)
    assert (close.preference, close.decided_by, close.probability_a, len(close.parts)) == ("B", "s2", 0.2, 2)
    assert close.notes[0] == "s1: margin 0.050 under 0.1" and close.notes[-1].startswith("decided by s2 (stage 2 of 3)")
    # the last stage found no verdict: the latest stage that had one stands, and says it was stage 2
    assert (lost.preference, lost.decided_by, len(lost.parts)) == ("A", "s2", 3)
    nothing = ask(stages({"q": None}, {"q": None}), "q")
    assert nothing.preference is None and nothing.decided_by is None and nothing.reason == "unparsed"
    assert ask(judge.with_threshold(0.04), "close").decided_by == "s1"  # a smaller threshold trusts the close call


def analysis(swapped, preference, probability):
    return Analysis(text="", preference=preference, swapped=swapped, parsed=True, raw="", probability=probability)


def test_orders_that_lean_different_ways_are_doubted_whatever_the_margin():
    split = Judgment(
        preference="A", probability_a=0.75, analyses=(analysis(False, "A", 0.99), analysis(True, "B", 0.51))
    )  # per order: 0.99 and 0.49
    assert orders_disagree(split) and doubt(split, 0.1) == "the two orders disagree"
    agree = Judgment(preference="A", probability_a=0.75, analyses=(analysis(False, "A", 0.9), analysis(True, "A", 0.6)))
    assert not orders_disagree(agree) and doubt(agree, 0.1) is None and doubt(agree, 0.3) == "margin 0.250 under 0.3"
    voted = Judgment(preference="A", analyses=(analysis(False, "A", None), analysis(True, "B", None)))
    assert orders_disagree(voted)  # no probabilities: the votes per order
    one_order = Judgment(preference="A", probability_a=0.9, analyses=(analysis(False, "A", 0.9),))
    assert not orders_disagree(one_order)


def ladder_lm():
    """Every step parses but gives no probabilities (a DummyLM): every stage is in doubt, so the ladder is climbed."""
    return fake(
        {
            "fields: `reflection`": {"reflection": "the first is careful", "more_reliable": "1"},
            "fields: `analysis`": {"analysis": "A is right", "preference": "A"},
            "fields: `preference`": {"preference": "A"},
        }
    )


def test_a_step_an_earlier_stage_made_is_charged_once_and_the_budget_caps_the_climb(tmp_path):
    pair = PAIR
    with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=ladder_lm()):
        full = EscalatingJudge().judge(pair)
        capped = EscalatingJudge(max_calls=5).judge(pair)
    assert [len(p.steps) for p in full.parts] == [2, 2, 4, 4] and full.decided_by is None
    # direct 2 + analyses 2 + samples 2 new + reflection 2 new: the shared analyses come from the cache, charged once
    assert full.cost.lm_calls == 8 and [p.cost.lm_calls for p in full.parts] == [2, 2, 2, 2]
    assert full.parts[2].analyses[0].cached and full.parts[2].analyses[0].usage.lm_calls == 0
    assert len(capped.parts) == 2 and capped.cost.lm_calls == 4
    assert "budget: samples not run, 2 more calls would overrun max_calls = 5 (4 spent)" in capped.notes
    with use_cache(JudgmentCache(enabled=False)), dspy.context(lm=ladder_lm()):
        uncached = EscalatingJudge().judge(pair)
        capped = EscalatingJudge(max_calls=7).judge(pair)
    assert uncached.cost.lm_calls == 12  # with the cache off every stage really makes its own steps
    assert len(capped.parts) == 2  # and the budget counts them: 4 + 4 > 7


def test_a_replay_at_a_lower_threshold_is_the_run_at_that_threshold():
    tables = ({"a": 0.9, "b": 0.58, "c": 0.52, "d": None}, {"b": 0.3, "c": 0.56, "d": 0.45}, {"c": 0.9, "d": 0.7})
    full = stages(*tables).with_threshold(1.0)
    for threshold in (0.0, 0.05, 0.07, 0.1, 0.3):
        direct = stages(*tables).with_threshold(threshold)
        for prompt in "abcd":
            replayed = full.replay(ask(full, prompt), threshold)
            made = ask(direct, prompt)
            assert (
                replayed.preference,
                replayed.decided_by,
                replayed.probability_a,
                len(replayed.parts),
                replayed.notes,
            ) == (made.preference, made.decided_by, made.probability_a, len(made.parts), made.notes), (
                threshold,
                prompt,
            )


def labelled(prompt, label):
    return Pair(prompt=prompt, response_a="x", response_b="y", label=label)


def test_the_threshold_is_chosen_on_dev_pairs_for_accuracy_then_cost():
    # stage 1 is right on a, wrong on the close calls b and c; stage 2 is right on b and c
    tables = ({"a": 0.9, "b": 0.55, "c": 0.42}, {"a": 0.2, "b": 0.1, "c": 0.8})
    dev = [labelled("a", "A"), labelled("b", "B"), labelled("c", "A")]
    choice = choose_threshold(stages(*tables), dev, thresholds=(0.0, 0.05, 0.1, 0.2, 0.45))
    rows = {t: (acc, calls) for t, acc, calls in choice.table}
    assert rows[0.0] == (pytest.approx(1 / 3), 1.0) and rows[0.1] == (1.0, pytest.approx(5 / 3))
    assert rows[0.45] == (pytest.approx(2 / 3), 2.0)  # climbing on a too, where stage 2 is wrong
    assert choice.threshold == 0.1 and choice.pairs == 3  # 0.1 and 0.2 are right everywhere at the same cost: the lower
    cheap = choose_threshold(stages(*tables), dev, thresholds=(0.0, 0.1), max_calls_per_judgment=1.5)
    assert cheap.threshold == 0.0
    with pytest.raises(ValueError, match="the first stage alone spends 1.00"):
        choose_threshold(stages(*tables), dev, max_calls_per_judgment=0.5)


def test_it_saves_its_stages_threshold_and_budget_and_loads_in_a_fresh_process(tmp_path):
    members, names = ladder(["big"])
    judge = EscalatingJudge(
        [(Calibrated(members[0][0], Calibration("temperature", 0.5, fitted_on={"split": "dev"})), None), *members[1:4]],
        names[:4],
        threshold=0.07,
        max_calls=6,
        chosen_on={"split": "dev", "pairs": 9},
    )
    path = judge.save(tmp_path / "escalating.json")
    code = f"""
from reflectagent.programs import load_program
j = load_program({str(path)!r})
print(j.stages, j.threshold, j.max_calls, j.options["chosen_on"]["pairs"], type(j.members[0]).__name__,
      j.members[0].calibration.temperature, [len(p) for p in j._plans])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['direct-prob', 'analyses', 'samples', 'reflection'] 0.07 6 9 Calibrated 2.0 [2, 2, 4, 4]"
    assert json.loads(path.read_text())["options"]["members"][0]["program"] == "Calibrated"


def test_the_named_program_takes_a_threshold():
    assert named_program("escalating-prob").threshold == 0.1 and named_program("escalating-prob:0.25").threshold == 0.25
    assert named_program("escalating-prob").stages == ["direct-prob", "analyses", "samples", "reflection"]
    with pytest.raises(ConfigError, match="a number in"):
        named_program("escalating-prob:lots")
    with pytest.raises(ConfigError, match="unknown program 'genrm:0.1'"):
        named_program("genrm:0.1")
    with pytest.raises(ValueError, match="2 stage names for 3 stages"):
        EscalatingJudge([(GenRM(), None)] * 3, ["a", "b"])
