"""Programs' control flow on deterministic fakes: votes, stage-2 selection, adaptive skip, ties,
ranking maths, ensembles, saving and compiling."""

import json
import math
import random
import subprocess
import sys

import dspy
import pytest
from fakes import BAD, GOOD, PAIR, ScoreJudge, biased_analyst, fair_analyst, reflective

from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.judge import Judge, PositionSwapJudge, ProgramFileError
from reflectagent.pairs import Pair
from reflectagent.programs import (
    AdaptiveReflectRM,
    Cascade,
    Ensemble,
    GenRM,
    MTBenchJudge,
    ReflectRM,
    load_program,
    rank,
)
from reflectagent.programs.compile import compile_judge, preference_metric, to_examples
from reflectagent.programs.genrm import majority, probability_verdict
from reflectagent.programs.ranking import bradley_terry
from reflectagent.programs.reflectrm import most_reliable, reliability_weights, settled, weighted_probability
from reflectagent.results import Analysis, Judgment, Reflection


def analysis(preference, probability=None, parsed=True):
    return Analysis(
        text="",
        preference=preference if parsed else None,
        swapped=False,
        parsed=parsed,
        raw="",
        probability=probability,
    )


def reflection(first, second, winner, probability_first=None):
    return Reflection(
        text="",
        first=first,
        second=second,
        more_reliable=winner,
        parsed=winner is not None,
        raw="",
        probability_first=probability_first,
    )


@pytest.fixture(autouse=True)
def no_cache():
    """Fakes share the identity "dummy": keep their steps out of each other's way."""
    with use_cache(JudgmentCache(enabled=False)):
        yield


def test_genrm_one_order_two_orders_and_votes():
    with dspy.context(lm=biased_analyst()):
        one = GenRM()(**PAIR.inputs())
        both = GenRM(both_orders=True).judge(PAIR)
    assert one.preference == "A" and len(one.analyses) == 1 and one.lm_calls == 1
    assert both.preference is None and both.reason == "inconsistent across orders"
    with dspy.context(lm=fair_analyst()):
        voted = GenRM(samples=3, both_orders=True).judge(PAIR)
    assert voted.preference == "A" and len(voted.analyses) == 6 and voted.lm_calls == 6
    assert {(a.swapped, a.sample) for a in voted.analyses} == {(s, k) for k in range(3) for s in (False, True)}


def test_direct_genrm_asks_for_the_verdict_alone():
    from dspy.utils.dummies import DummyLM

    from reflectagent.adapter import JudgeAdapter

    lm = DummyLM(
        {f"[[ ## response_a ## ]]\n{GOOD}": {"preference": "A"}, f"[[ ## response_a ## ]]\n{BAD}": {"preference": "B"}},
        adapter=JudgeAdapter(),
    )
    with dspy.context(lm=lm):
        judged = GenRM(both_orders=True, rationale=False).judge(PAIR)
    assert judged.preference == "A" and all(a.text == "" for a in judged.analyses)
    assert '"analysis"' not in lm.history[-1]["messages"][0]["content"]  # no rationale asked for
    assert GenRM(rationale=False).options["rationale"] is False and "rationale" not in GenRM().options


def test_vote_and_probability_rules():
    assert majority((analysis("A"), analysis("A"), analysis("B"))) == ("A", None)
    assert majority((analysis("A"), analysis("B"), analysis("A"), analysis("B"))) == (None, "tied vote")
    assert majority((analysis(None, parsed=False),)) == (None, "unparsed")
    assert probability_verdict(0.7) == ("A", None) and probability_verdict(0.2) == ("B", None)
    assert probability_verdict(0.5) == (None, "tied probability")
    assert probability_verdict(None) == (None, "no verdict probabilities")
    with dspy.context(lm=fair_analyst()):  # DummyLM gives no log-probs: said, not guessed
        judged = GenRM(both_orders=True, decision="probability").judge(PAIR)
    assert judged.preference is None and judged.reason == "no verdict probabilities"


def test_reflectrm_trusts_the_analysis_reflection_prefers():
    with dspy.context(lm=reflective()):
        judgment = ReflectRM().judge(PAIR)
    straight, swapped = judgment.analyses
    assert (straight.preference, swapped.preference) == ("A", "B")  # swapped analysis fell for position
    assert len(judgment.reflections) == 2  # one comparison, shown in both orders
    assert {(r.first, r.second) for r in judgment.reflections} == {(0, 1), (1, 0)}
    assert all(r.more_reliable == 0 for r in judgment.reflections)
    assert judgment.preference == "A" and judgment.chosen == 0 and judgment.lm_calls == 4


def test_position_biased_reflection_ties_and_says_so():
    with dspy.context(lm=reflective(reflector_bias="1")):
        judgment = ReflectRM().judge(PAIR)
    assert [r.more_reliable for r in judgment.reflections] == [0, 1]
    assert judgment.preference is None and judgment.reason == "reflection tie"


def test_tie_rule():
    agree = (analysis("A"), analysis("A"))
    assert most_reliable(agree, ()) == (0, None)
    split = (analysis("A", 0.9), analysis("B", 0.6))
    assert most_reliable(split, (reflection(0, 1, 0), reflection(1, 0, 1))) == (0, None)  # more confident
    assert most_reliable(split, (reflection(0, 1, 1), reflection(1, 0, 1))) == (1, None)  # more wins
    flat = (analysis("A", 0.8), analysis("B", 0.8))
    assert most_reliable(flat, ()) == (None, "reflection tie")
    assert most_reliable((analysis(None, parsed=False), analysis("B")), ()) == (1, None)
    assert most_reliable((analysis(None, parsed=False),) * 2, ()) == (None, "unparsed")


def test_reflection_probabilities_weigh_the_analyses_and_cancel_a_position_locked_reflector():
    straight, swapped = analysis("A", 0.8), analysis("B", 0.6)  # P(A) 0.8 and 0.4
    # A reflector that always says "1", but leans towards analysis 0 in both orders: 0 gets 0.9 + 0.3 of 2.
    locked = (reflection(0, 1, 0, probability_first=0.9), reflection(1, 0, 1, probability_first=0.7))
    assert reliability_weights((straight, swapped), locked) == pytest.approx({0: 0.6, 1: 0.4})
    probability_a, heaviest = weighted_probability((straight, swapped), locked)
    assert probability_a == pytest.approx(0.6 * 0.8 + 0.4 * 0.4) and heaviest == 0
    # Without reflections the weights are equal: GenRM's order-averaged probability.
    assert weighted_probability((straight, swapped), ())[0] == pytest.approx(0.6)
    # An unparsed reflection carries no weight; the others still do.
    assert reliability_weights((straight, swapped), (*locked, reflection(0, 1, None))) == pytest.approx(
        {0: 0.6, 1: 0.4}
    )
    assert reliability_weights((straight, swapped), (reflection(0, 1, None),)) == {0: 0.5, 1: 0.5}
    assert weighted_probability((straight, analysis("B")), ()) == (None, None)  # a missing probability: no verdict


def test_probability_decisions_say_why_they_have_no_verdict():
    with dspy.context(lm=reflective()):  # DummyLM gives no log-probs
        judged = ReflectRM(decision="probability").judge(PAIR)
        swap = PositionSwapJudge(decision="probability").judge(PAIR)
    assert judged.preference is None and judged.reason == "no verdict probabilities" and judged.reflections
    assert "no reflection carried a probability: the analyses weighed equally" in judged.notes
    assert swap.preference is None and swap.reason == "no verdict probabilities"
    with pytest.raises(ValueError, match="decision must be"):
        ReflectRM(decision="majority")


def test_adaptive_skip_under_the_probability_rule_is_exact():
    """Skipped only when every P(A) is on one side of 0.5: then no weighting can change the verdict."""
    rng = random.Random(1)
    for _ in range(500):
        k = rng.randint(2, 5)
        analyses = tuple(analysis(rng.choice("AB"), rng.uniform(0.3, 1.0)) for _ in range(k))
        if not settled(analyses, "probability"):
            continue
        reflections = tuple(
            reflection(i, j, i, rng.random() if rng.random() < 0.8 else None)  # some unparsed
            for i in range(k)
            for j in range(k)
            if i != j
        )
        full, _ = weighted_probability(analyses, reflections)
        skipped, _ = weighted_probability(analyses, ())
        assert (full > 0.5) == (skipped > 0.5)
    # verdicts agree, but one sample's token went against its own probability: not settled
    assert settled((analysis("A", 0.9), analysis("A", 0.3)), "vote")
    assert not settled((analysis("A", 0.9), analysis("A", 0.3)), "probability")


def test_adaptive_reflectrm_matches_full_on_the_same_samples(tmp_path):
    for lm in (fair_analyst(), biased_analyst(), reflective(), reflective("2")):
        with use_cache(JudgmentCache(tmp_path / str(id(lm)))), dspy.context(lm=lm):
            full = ReflectRM(samples=2).judge(PAIR)
            adaptive = AdaptiveReflectRM(samples=2).judge(PAIR)
        assert adaptive.preference == full.preference and adaptive.reason == full.reason
        assert adaptive.lm_calls == 0  # stage 1 came from the cache; stage 2 only if needed, also cached
        unanimous = len({a.preference for a in full.analyses}) == 1
        assert len(adaptive.reflections) == (0 if unanimous else len(full.reflections))


def test_adaptive_skip_is_equivalent_for_any_unanimous_stage_one():
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(2, 5)
        verdict = rng.choice("AB")
        analyses = tuple(
            analysis(verdict, rng.random()) if rng.random() > 0.2 else analysis(None, parsed=False) for _ in range(k)
        )
        parsed = [i for i, a in enumerate(analyses) if a.parsed]
        reflections = tuple(reflection(i, j, rng.choice([i, j, None])) for i in parsed for j in parsed if i != j)
        full_winner, _ = most_reliable(analyses, reflections)
        skip_winner, _ = most_reliable(analyses, ())
        full = analyses[full_winner].preference if full_winner is not None else None
        skip = analyses[skip_winner].preference if skip_winner is not None else None
        assert full == skip


def test_bradley_terry_and_ranking():
    strengths = bradley_terry(2, [(0, 1, 1.0)] * 3 + [(0, 1, 0.0)], prior=0.0)
    assert math.isclose(strengths[0] - strengths[1], math.log(3), rel_tol=1e-6)
    assert bradley_terry(3, [(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5)]) == pytest.approx([0, 0, 0], abs=1e-9)
    responses = ["3", "9", "1", "7", "5"]
    ranking = rank(ScoreJudge(), "rank these", responses)
    assert ranking.order == (1, 3, 4, 0, 2) and len(ranking.comparisons) == 10
    assert ranking.win_rate[1] == 1.0 and ranking.win_rate[2] == 0.0
    ordered = [ranking.strength[i] for i in ranking.order]
    assert ordered == sorted(ordered, reverse=True) and ordered[0] > ordered[1]
    tournament = rank(ScoreJudge(), "rank these", responses, method="tournament")
    assert tournament.best == 1 and len(tournament.comparisons) == len(responses) - 1
    drawn = rank(ScoreJudge(), "p", ["2", "2", "2"], method="tournament", seed=3)
    assert drawn.order == rank(ScoreJudge(), "p", ["2", "2", "2"], method="tournament", seed=3).order


def test_ensemble_votes_and_cascade_escalates():
    fair, biased = fair_analyst(), biased_analyst()
    ensemble = Ensemble([(GenRM(), fair), (GenRM(), biased), (GenRM(both_orders=True), fair)])
    flipped = Pair(prompt=PAIR.prompt, response_a=BAD, response_b=GOOD)
    judged = ensemble.judge(flipped)  # fair says B twice, biased says A
    assert judged.preference == "B" and [p.preference for p in judged.parts] == ["B", "A", "B"]
    assert judged.lm_calls == 4
    cascade = Cascade([(PositionSwapJudge(), biased), (GenRM(both_orders=True), fair)])
    escalated = cascade.judge(PAIR)
    assert escalated.preference == "A" and len(escalated.parts) == 2 and escalated.notes[0] == "escalated to member 1"
    settled = Cascade([(GenRM(), biased), (GenRM(both_orders=True), fair)]).judge(PAIR)
    assert len(settled.parts) == 1 and settled.lm_calls == 1
    assert Judgment.from_dict(escalated.to_dict()) == escalated


class SureJudge(Judge):
    """A model-free judge with a fixed P(A) (None: a verdict without one)."""

    def __init__(self, probability_a):
        super().__init__(probability_a=probability_a)

    def decide(self, pair: Pair) -> Judgment:
        p = self.options["probability_a"]
        return Judgment(preference="A" if p is None or p > 0.5 else "B", probability_a=p)


def test_ensemble_by_probability_lets_the_surer_member_settle_a_disagreement():
    members = [(SureJudge(0.9), None), (SureJudge(0.3), None)]
    assert Ensemble(members).judge(PAIR).reason == "tied vote"
    judged = Ensemble(members, decision="probability").judge(PAIR)
    assert judged.preference == "A" and judged.probability_a == pytest.approx(0.6) and len(judged.parts) == 2
    assert (
        Ensemble([(SureJudge(0.2), None), (SureJudge(0.4), None)], decision="probability").judge(PAIR).preference == "B"
    )
    tied = Ensemble([(SureJudge(0.7), None), (SureJudge(0.3), None)], decision="probability").judge(PAIR)
    assert tied.preference is None and tied.reason == "tied probability"
    missing = Ensemble([(SureJudge(0.9), None), (SureJudge(None), None)], decision="probability").judge(PAIR)
    assert missing.preference is None and missing.reason == "no P(A) from member(s) [1]"
    with pytest.raises(ValueError, match="decision must be"):
        Ensemble(members, decision="mean")


def test_metric_rules():
    [example] = to_examples([PAIR])
    assert preference_metric(example, Judgment(preference="A")) == 1.0
    assert preference_metric(example, Judgment(preference="B")) == 0.0
    assert preference_metric(example, Judgment(preference=None, reason="unparsed")) == 0.0
    [tie] = to_examples([Pair(prompt="p", response_a="x", response_b="y", label="tie")])
    assert preference_metric(tie, Judgment(preference="A")) == 0.5
    mixed = Judgment(preference="A", analyses=(analysis("A"), analysis("B")))
    assert preference_metric(example, mixed) == 1.0 and preference_metric(example, mixed, trace=[]) is False


def test_save_and_load_in_a_fresh_process(tmp_path):
    program = ReflectRM(samples=4, adaptive=True)
    program.analyzer.predict.demos = [
        dspy.Example(prompt="p", response_a="x", response_b="y", analysis="x is right", preference="A")
    ]
    path = program.save(tmp_path / "reflectrm.json")
    code = (
        "import sys, json; sys.path.insert(0, 'tests');"
        "from reflectagent.programs import load_program;"
        f"p = load_program({str(path)!r});"
        "print(json.dumps([type(p).__name__, p.options, len(p.analyzer.predict.demos), p.analyzer.predict.demos[0]['analysis']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [
        "ReflectRM",
        {"samples": 4, "adaptive": True, "temperature": 0.7, "decision": "vote"},
        1,
        "x is right",
    ]
    with pytest.raises(ProgramFileError, match="holds a ReflectRM program, not GenRM"):
        GenRM.load(path)
    data = json.loads(path.read_text())
    data["reflectagent"]["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ProgramFileError, match="saved by ReflectRM version 99; this is version 1"):
        load_program(path)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ProgramFileError, match="not a saved reflectagent program"):
        load_program(tmp_path / "junk.json")


def test_adaptive_reflectrm_is_a_class_that_saves_and_loads_as_itself(tmp_path):
    program = AdaptiveReflectRM(samples=4)
    assert isinstance(program, ReflectRM) and program.adaptive
    loaded = load_program(program.save(tmp_path / "adaptive.json"))
    assert type(loaded) is AdaptiveReflectRM and loaded.adaptive
    assert loaded.options == {"samples": 4, "temperature": 0.7, "decision": "vote"}
    with pytest.raises(ProgramFileError, match="holds a AdaptiveReflectRM program, not ReflectRM"):
        ReflectRM.load(tmp_path / "adaptive.json")


def test_bootstrap_compiles_demos_that_change_the_cache_key(tmp_path):
    train = [PAIR, Pair(prompt=PAIR.prompt, response_a=BAD, response_b=GOOD, label="B", id="flipped")]
    with use_cache(JudgmentCache(tmp_path)), dspy.context(lm=fair_analyst()):
        program = GenRM(both_orders=True)
        before = program.judge(PAIR)
        compiled = compile_judge(program, train, "bootstrap", max_demos=2)
        after = compiled.judge(PAIR)
    assert program.analyzer.predict.demos == []  # the original is untouched
    demos = compiled.analyzer.predict.demos
    assert len(demos) == 2 and all(d["preference"] in ("A", "B") for d in demos)
    assert before.lm_calls == 2 and after.lm_calls == 2  # compiled state is part of the key: no stale hits


def test_mipro_compiles_with_a_proposer_model():
    proposer = DummyLMChat({"": {"proposed_instruction": "Compare the two responses carefully; facts first."}})
    train = [PAIR, Pair(prompt=PAIR.prompt, response_a=BAD, response_b=GOOD, label="B", id="f")] * 2
    with dspy.context(lm=fair_analyst()):
        compiled = compile_judge(
            GenRM(), train, "mipro", prompt_model=proposer, max_demos=1, num_trials=2, num_threads=1
        )
        judged = compiled.judge(PAIR)
    assert judged.preference == "A"
    assert isinstance(compiled, GenRM)


def DummyLMChat(answers):  # noqa: N802
    from dspy.utils.dummies import DummyLM

    return DummyLM(answers)


class FreeText:
    """Makes DummyLM answer in free text (the MT-Bench baseline parses no JSON)."""

    @staticmethod
    def format_field_with_value(fields_with_values, role="assistant"):
        return next(iter(fields_with_values.values()))


def free_text(good_first: str, bad_first: str):
    from dspy.utils.dummies import DummyLM

    first = "[The Start of Assistant A's Answer]\n"
    return DummyLM({first + GOOD: {"text": good_first}, first + BAD: {"text": bad_first}}, adapter=FreeText())


def test_mtbench_baseline_uses_its_own_prompt_both_orders_and_never_guesses():
    from reflectagent.programs.peer import SYSTEM

    lm = free_text("A is right. [[A]]", "B is right. [[B]]")
    with dspy.context(lm=lm):
        judged = MTBenchJudge().judge(PAIR)
    assert judged.preference == "A" and [a.preference for a in judged.analyses] == ["A", "A"]
    assert judged.analyses[0].text == "A is right."
    assert lm.history[0]["messages"][0]["content"] == SYSTEM
    for good_first, bad_first, reason in (
        ("[[A]]", "[[A]]", "inconsistent across orders"),
        ("[[C]]", "[[B]]", "tie"),
        ("A wins", "[[B]]", "unparsed"),
    ):
        with dspy.context(lm=free_text(good_first, bad_first)):
            judged = MTBenchJudge().judge(PAIR)
        assert judged.preference is None and judged.reason == reason


def test_sync_and_async_give_the_same_judgments_and_sync_works_inside_a_running_loop():
    import asyncio

    from reflectagent.judge import ajudge_pairs, judge_pairs

    flipped = Pair(prompt=PAIR.prompt, response_a=BAD, response_b=GOOD)
    with dspy.context(lm=reflective()):
        program = ReflectRM(samples=4)
        synced = judge_pairs(program, [PAIR, flipped], concurrency=2, progress=False)
        awaited = asyncio.run(ajudge_pairs(program, [PAIR, flipped], concurrency=2, progress=False))
        one = asyncio.run(program.acall(**PAIR.inputs()))

        async def inside_a_loop():  # a notebook or an async app calling the sync API
            return program.judge(PAIR)

        nested = asyncio.run(inside_a_loop())

    def strip(j):
        return (
            j.preference,
            j.reason,
            j.chosen,
            [a.preference for a in j.analyses],
            [(r.first, r.second, r.more_reliable) for r in j.reflections],
        )

    assert [strip(j) for j in synced] == [strip(j) for j in awaited]
    assert strip(one) == strip(synced[0]) == strip(nested)
    assert [j.preference for j in synced] == ["A", "B"]


def test_a_subclass_is_judged_by_its_own_decision_on_both_paths_and_a_cancelled_waiter_leaves_the_maker_alone(tmp_path):
    import asyncio

    from reflectagent.judge import ajudge_pairs, judge_pairs

    class Contrary(PositionSwapJudge):  # a sync override of an async-first program
        def decide(self, pair):
            return Judgment(preference="B", reason="contrary")

    assert judge_pairs(Contrary(), [PAIR], progress=False)[0].reason == "contrary"
    assert asyncio.run(ajudge_pairs(Contrary(), [PAIR], progress=False))[0].reason == "contrary"
    assert Contrary().judge(PAIR).reason == "contrary"

    async def one_waiter_gives_up():
        with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=fair_analyst()):
            maker = asyncio.ensure_future(GenRM().ajudge(PAIR))
            waiter = asyncio.ensure_future(GenRM().ajudge(PAIR))
            await asyncio.sleep(0)
            waiter.cancel()
            judged = await maker
            with pytest.raises(asyncio.CancelledError):
                await waiter
            return judged

    judged = asyncio.run(one_waiter_gives_up())
    assert judged.preference == "A"
