"""Control flow with deterministic fake LMs (DummyLM): order mapping, unparsed, cache keys."""

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from dspy.utils.exceptions import AdapterParseError

from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.adapter import JudgeAdapter, output_schema
from reflectagent.judge import PositionSwapJudge
from reflectagent.modules import Analyzer, Reflector, VerdictStep
from reflectagent.pairs import Pair
from reflectagent.results import Analysis, Judgment
from reflectagent.signatures import Analyze, Reflect

GOOD, BAD = "The capital of France is Paris.", "The capital of France is Berlin."
PAIR = Pair(prompt="What is the capital of France?", response_a=GOOD, response_b=BAD, label="A")


def content_judge():
    """Prefers whichever position holds GOOD: a judge with no position bias."""
    return DummyLM(
        {
            f"[[ ## response_a ## ]]\n{GOOD}": {"analysis": "A is right", "preference": "A"},
            f"[[ ## response_b ## ]]\n{GOOD}": {"analysis": "B is right", "preference": "B"},
        },
        adapter=JudgeAdapter(),
    )


def position_judge(answer="A"):
    """Always names the same position: pure position bias."""
    return DummyLM({"": {"analysis": "first looks fine", "preference": answer}}, adapter=JudgeAdapter())


def test_swapped_analysis_is_mapped_back_to_the_original_order(cache):
    with dspy.context(lm=content_judge()):
        straight = Analyzer()(PAIR, swapped=False)
        swapped = Analyzer()(PAIR, swapped=True)
    assert (straight.preference, straight.swapped) == ("A", False)
    assert (swapped.preference, swapped.swapped) == ("A", True)  # the model said "B" about the swapped pair
    assert swapped.text == "B is right"


def test_verdict_step_judges_an_analysis_written_elsewhere(cache):
    """A critique from elsewhere (a person, a teacher file) turned into a verdict, in the caller's order."""
    written = Analysis(
        text="Only the second response names the right capital.", preference=None, swapped=False, parsed=True, raw=""
    )
    lm = DummyLM({"[[ ## analysis ## ]]\nOnly the second": {"preference": "A"}}, adapter=JudgeAdapter())
    with dspy.context(lm=lm):
        straight = VerdictStep()(PAIR, written)
        swapped = VerdictStep()(PAIR, written, swapped=True)
    assert (straight.preference, straight.text, straight.swapped) == ("A", written.text, False)
    assert (swapped.preference, swapped.swapped) == ("B", True)  # "A" about the swapped pair is B here
    assert "Verdict: none" in lm.history[-1]["messages"][-1]["content"]  # the analysis came without a verdict


def test_a_reflection_reads_each_analysis_named_in_the_order_it_shows_the_pair(cache):
    """An analysis of the swapped pair names the responses as it saw them; shown to a reflection in another order,
    its names are exchanged with its verdict, so its text and its verdict agree about which response it means."""

    def written(text, swapped):
        return Analysis(text=text, preference="A", swapped=swapped, parsed=True, raw="")  # both prefer Paris

    analyses = (written("response_a names Paris; Response B does not", False), written("Response B names Paris", True))
    lm = DummyLM([{"reflection": "both name Paris", "more_reliable": "1"}] * 2, adapter=JudgeAdapter())
    with dspy.context(lm=lm):
        Reflector()(PAIR, analyses, first=0, second=1)
        Reflector()(PAIR, analyses, first=0, second=1, swapped=True)
    straight, swapped = (call["messages"][-1]["content"] for call in lm.history)
    assert "response_a names Paris; Response B does not\nVerdict: A" in straight
    assert "Response A names Paris\nVerdict: A" in straight  # as it was written: "Response B", about B, A
    assert "response_b names Paris; Response A does not\nVerdict: B" in swapped
    assert "Response B names Paris\nVerdict: B" in swapped


def test_position_swap_judge_agrees_only_without_position_bias(cache):
    with dspy.context(lm=content_judge()):
        fair = PositionSwapJudge().judge(PAIR)
    with dspy.context(lm=position_judge()), use_cache(JudgmentCache(enabled=False)):  # same "dummy" identity
        biased = PositionSwapJudge().judge(PAIR)
    assert fair.preference == "A" and fair.reason is None and fair.lm_calls == 2
    assert biased.preference is None and biased.reason == "inconsistent across orders"
    assert [a.preference for a in biased.analyses] == ["A", "B"]


def test_unparsed_output_never_becomes_a_verdict(cache):
    junk = DummyLM({"": {"analysis": "hmm", "preference": "both"}}, adapter=JudgeAdapter())
    with dspy.context(lm=junk), use_cache(JudgmentCache(enabled=False)):
        judgment = PositionSwapJudge().judge(PAIR)
    assert judgment.preference is None and judgment.reason == "unparsed"
    assert all(not a.parsed and a.preference is None for a in judgment.analyses)
    assert all(a.error.startswith("unparsed: field 'preference'") for a in judgment.analyses)
    assert '"preference":"both"' in judgment.analyses[0].raw


def test_identical_responses_get_no_verdict_and_no_calls(cache):
    with dspy.context(lm=position_judge()), use_cache(JudgmentCache(enabled=False)):
        judgment = PositionSwapJudge().judge(Pair(prompt="p", response_a="same", response_b="same "))
    assert judgment.preference is None and "identical" in judgment.reason and judgment.lm_calls == 0


def test_cache_serves_repeats_and_misses_on_changed_instructions(cache):
    with dspy.context(lm=content_judge()):
        first = PositionSwapJudge().judge(PAIR)
        again = PositionSwapJudge().judge(PAIR)
        changed = PositionSwapJudge()
        changed.analyzer.predict.signature = Analyze.with_instructions("Prefer the shorter response.")
        recompiled = changed.judge(PAIR)
        resampled = Analyzer()(PAIR, sample=1)
    assert first.lm_calls == 2 and first.cache_hits == 0
    assert again.lm_calls == 0 and again.cache_hits == 2 and again.preference == first.preference
    assert again.cost == first.cost  # the original cost is kept for accounting
    assert recompiled.lm_calls == 2 and recompiled.cache_hits == 0
    assert not resampled.cached
    assert len(cache) == 5


def test_cached_steps_leave_a_trace_for_optimisers_bounded_like_live_ones(cache):
    with dspy.context(lm=content_judge()):
        PositionSwapJudge().judge(PAIR)  # both steps made and cached
        with dspy.context(trace=[], max_trace_size=3):
            for _ in range(3):
                PositionSwapJudge().judge(PAIR)  # six cached steps
            kept = list(dspy.settings.trace)
        with dspy.context(trace=None):
            assert PositionSwapJudge().judge(PAIR).cache_hits == 2  # no trace kept, nothing fails
    assert len(kept) == 3 and all(isinstance(entry[2], dspy.Prediction) for entry in kept)


def test_reflector_names_an_analysis_by_index(cache):
    lm = DummyLM({"": {"reflection": "the second checks the facts", "more_reliable": "2"}}, adapter=JudgeAdapter())
    analyses = (
        Analysis(text="B is right", preference="B", swapped=False, parsed=True, raw=""),
        Analysis(text="A is right", preference="A", swapped=True, parsed=True, raw=""),
    )
    with dspy.context(lm=lm):
        reflection = Reflector()(PAIR, analyses, first=0, second=1)
        reversed_ = Reflector()(PAIR, analyses, first=1, second=0)
    assert reflection.more_reliable == 1 and reversed_.more_reliable == 0


def test_strict_parse_and_schema():
    adapter = JudgeAdapter()
    assert adapter.parse(Analyze, 'Sure!\n```json\n{"analysis": "x", "preference": "B"}\n```') == {
        "analysis": "x",
        "preference": "B",
    }
    for junk in ["A", '{"analysis": "x"}', '{"analysis": "x", "preference": "C"}', "{'analysis': 'x'"]:
        with pytest.raises(AdapterParseError):
            adapter.parse(Analyze, junk)
    schema = output_schema(Reflect)
    assert list(schema["properties"]) == ["reflection", "more_reliable"]
    assert schema["properties"]["more_reliable"]["enum"] == ["1", "2"]
    assert schema["properties"]["reflection"]["maxLength"] == 480


def test_the_output_format_is_described_not_templated():
    """A small model copies a template's placeholder ("{analysis}") as its answer: give it none."""
    system = JudgeAdapter().format(Analyze, [], {"prompt": "p", "response_a": "a", "response_b": "b"})[0]["content"]
    assert "{analysis}" not in system and "{preference}" not in system
    assert '- "analysis": a brief comparison' in system and '- "preference":' in system and '"A", "B"' in system
    assert system.index('"analysis"') < system.index('"preference"')  # the analysis comes first
    assert "[[ ## response_b ## ]]" in system  # DSPy's input layout is kept


def test_judgment_round_trips_through_a_dict(cache):
    with dspy.context(lm=content_judge()):
        judgment = PositionSwapJudge().judge(PAIR)
    assert Judgment.from_dict(judgment.to_dict()) == judgment


def test_concurrent_identical_steps_make_one_call(cache):
    from reflectagent.concurrency import run_all

    lm = content_judge()
    with dspy.context(lm=lm):
        analyses = run_all([lambda: Analyzer()(PAIR) for _ in range(6)])
    assert len(lm.history) == 1  # one request; the other five waited and read the cache
    assert sum(not a.cached for a in analyses) == 1 and len({a.text for a in analyses}) == 1


class CountingJudge(PositionSwapJudge):
    """Async, model-free: A wins unless response_a says "fail" (then an error); counts judgments started."""

    def __init__(self):
        super().__init__()
        self.started = 0

    async def adecide(self, pair: Pair) -> Judgment:
        import asyncio

        self.started += 1
        await asyncio.sleep(0.001 * (int(pair.id) % 3))  # finish out of order
        if pair.response_a == "fail":
            raise ValueError("a bug in this judge")
        return Judgment(preference="A")


def test_judgments_stream_in_input_order_and_only_a_window_is_started():
    import asyncio

    from reflectagent.judge import RunInterrupted, judge_in_order

    pairs = [Pair(prompt="q", response_a=f"a{i}", response_b="b", id=str(i)) for i in range(50)]
    judge = CountingJudge()

    async def first_five():
        seen = []
        async for pair, judgment in judge_in_order(judge, pairs, concurrency=2, window=6):
            seen.append((pair.id, judgment.preference))
            if len(seen) == 5:
                return seen

    assert asyncio.run(first_five()) == [(str(i), "A") for i in range(5)]
    assert judge.started <= 5 + 6  # the consumer stopped at 5: no more than a window beyond it was ever started

    async def every():
        return [pair.id async for pair, _ in judge_in_order(CountingJudge(), iter(pairs), concurrency=4)]

    assert asyncio.run(every()) == [p.id for p in pairs]  # any iterable, not only lists
    broken = pairs[:3] + [Pair(prompt="q", response_a="fail", response_b="b", id="3")] + pairs[4:]

    async def until_error():
        return [pair.id async for pair, _ in judge_in_order(CountingJudge(), broken, concurrency=4)]

    with pytest.raises(RunInterrupted, match="stopped after 3 of 50 judgments: ValueError: a bug in this judge"):
        asyncio.run(until_error())
