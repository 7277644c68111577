"""Metric functions against values computed by hand."""

import json

import pytest

from reflectagent.eval.metrics import (
    CostPerVerdict,
    Record,
    Summary,
    bootstrap,
    paired_difference,
    reliability,
    summarize,
    summarize_by_category,
    summarize_judgments,
    wilson,
)
from reflectagent.eval.report import accuracy_axis_label, baseline_run, markdown, paired_comparison, summary_markdown
from reflectagent.eval.runner import RunResult, RunStats
from reflectagent.pairs import Pair
from reflectagent.results import Analysis, Judgment, Usage


def record(pair_id, category, label, verdicts, unparsed=0):
    return Record(
        pair_id=pair_id,
        category=category,
        source="s",
        label=label,
        verdicts=verdicts,
        reasons=tuple(None if v else "unparsed" for v in verdicts),
        steps=2,
        unparsed_steps=unparsed,
        lm_calls=2,
        prompt_tokens=100,
        completion_tokens=20,
    )


RECORDS = [
    record("1", "x", "A", ("A", "A")),  # right twice, consistent
    record("2", "x", "A", ("A", "B")),  # picks the first position both times
    record("3", "y", "B", (None, "B"), unparsed=1),
    record("4", "y", "tie", ("B", "A")),  # picks the second position both times; never scored
    record("5", "y", "B", (None, None), unparsed=2),
]


def test_wilson_matches_the_textbook_interval():
    low, high = wilson(1, 5)
    assert low == pytest.approx(0.036222, abs=1e-5) and high == pytest.approx(0.624472, abs=1e-5)
    assert wilson(0, 0) is None
    assert wilson(5, 5)[1] == 1.0 and wilson(0, 5)[0] == 0.0


def test_bootstrap_brackets_the_mean_and_is_seeded():
    values = [1.0, 0.5, 0.5, 0.0]
    low, high = bootstrap(values)
    assert low <= 0.5 <= high and 0.0 <= low and high <= 1.0
    assert bootstrap(values) == bootstrap(values) and bootstrap([0.7] * 6) == pytest.approx((0.7, 0.7))
    assert bootstrap([]) is None


def test_summary_by_hand():
    summary = summarize(RECORDS)
    assert summary.pairs == 5 and summary.ties == 1
    assert summary.accuracy.value == pytest.approx((1 + 0.5 + 0.5 + 0) / 4) and summary.accuracy.n == 4
    assert summarize(RECORDS, no_verdict="half").accuracy.value == pytest.approx((1 + 0.5 + 0.75 + 0.5) / 4)
    assert summary.consistency.value == pytest.approx(1 / 5)
    assert summary.consistency.ci == pytest.approx(wilson(1, 5))
    assert summary.position_bias.first.value == pytest.approx(1 / 5)
    assert summary.position_bias.second.value == pytest.approx(1 / 5)
    assert summary.no_verdict.value == pytest.approx(3 / 10)
    assert summary.parse_failures.value == pytest.approx(3 / 10)
    assert summary.cost_per_verdict == CostPerVerdict(lm_calls=1.0, prompt_tokens=50.0, completion_tokens=10.0)
    assert summary.cost_per_verdict.tokens == 60.0


def test_summary_round_trips_through_report_json():
    summary = summarize(RECORDS)
    assert Summary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    assert summary.to_dict()["position_bias"]["first"]["count"] == 1  # report.json keeps its nested shape


def test_categories_including_an_empty_one():
    by = summarize_by_category(RECORDS, categories=["x", "y", "z"])
    assert by["x"].accuracy.value == pytest.approx(0.75)
    assert by["y"].accuracy.value == pytest.approx(0.25) and by["y"].ties == 1
    assert by["z"].pairs == 0 and by["z"].accuracy.value is None and by["z"].accuracy.ci is None
    assert by["z"].consistency.value is None and by["z"].cost_per_verdict.lm_calls is None


def test_paired_difference_by_hand():
    """Matched by pair id; ties and pairs the other run did not judge are left out."""
    better = [
        record("1", "x", "A", ("A", "A")),
        record("2", "x", "A", ("A", "A")),
        record("3", "y", "B", ("B", "B")),
        record("4", "y", "tie", ("A", "A")),
        record("6", "y", "A", ("A", "A")),
    ]  # "6": not in RECORDS
    diff = paired_difference(better, RECORDS)
    # pair 1: 1 - 1, pair 2: 1 - 0.5, pair 3: 1 - 0.5; pair 5 is only in RECORDS
    assert diff.n == 3 and diff.value == pytest.approx(1 / 3)
    assert diff.ci == bootstrap([0.0, 0.5, 0.5])
    assert paired_difference(better, RECORDS, no_verdict="half").value == pytest.approx((0 + 0.5 + 0.25) / 3)
    same = paired_difference(RECORDS, RECORDS)
    assert same.value == 0.0 and same.ci == (0.0, 0.0) and same.n == 4
    # an id given twice (two files named alike): each occurrence against the baseline's same occurrence
    twice = [record("d", "x", "A", ("A", "A")), record("d", "x", "B", ("A", "A"))]
    swapped = paired_difference(twice, [record("d", "x", "A", ("B", "B")), record("d", "x", "B", ("B", "B"))])
    assert swapped.n == 2 and swapped.value == 0.0  # (1 - 0) and (0 - 1); keyed by id alone it would be -0.5
    assert paired_difference(twice[:1], twice).n == 1  # the second occurrence has no partner
    nothing = paired_difference(better, [record("9", "x", "A", ("A", "A"))])
    assert nothing.value is None and nothing.ci is None and nothing.n == 0


def test_the_report_pairs_every_run_against_its_baseline():
    def run(name, records):
        return RunResult(name, "b", records, summarize(records), {}, {})

    base, good = (
        run("base", RECORDS),
        run(
            "good",
            [record("1", "x", "A", ("A", "A")), record("2", "x", "A", ("A", "A")), record("3", "y", "B", ("B", "B"))],
        ),
    )
    meta = {"data": ["d.jsonl"], "pairs": 5, "split": "test", "seed": 0}
    assert baseline_run([base]) is None and baseline_run([base, good]) is base
    assert baseline_run([base, good], "good @ b") is good and baseline_run([base, good], "good") is good
    with pytest.raises(ValueError, match="baseline 'nope' is none of the runs: base @ b, good @ b"):
        baseline_run([base, good], "nope")
    assert baseline_run([base, good], "good@b") is good  # the CLI's PROGRAM@BACKEND, spaces or not
    with pytest.raises(ValueError, match="baseline 'base @ c' is none of the runs"):
        baseline_run([base, good], "base @ c")  # the program exists, on another backend
    text = markdown([base, good], meta, paired_comparison([base, good]))
    # good is right on pairs 1-3, which base scores 1, 0.5 and 0.5: (0 + 0.5 + 0.5) / 3 over 3 pairs
    assert "## Paired against base @ b" in text
    assert "| good | b | +33.3 pts [+0.0, +50.0] | 3 |" in text and "| base | b |" not in text.split("## Paired")[1]
    assert "## Paired against good @ b" in markdown([base, good], meta, paired_comparison([base, good], "good"))
    assert paired_comparison([base]) is None and "## Paired" not in markdown([base], meta, paired_comparison([base]))


def test_plot_axis_names_the_no_verdict_rule_in_force():
    def run(rule):
        return RunResult("p", "b", RECORDS, summarize(RECORDS, rule), {}, {})

    assert accuracy_axis_label([run("wrong")]).endswith("no verdict = wrong)")
    assert accuracy_axis_label([run("half")]).endswith("no verdict = half)")


def test_run_line_counts_each_eval_calls_wall_time_once():
    def run(name, wall):
        stats = RunStats(wall_s_all_runs=wall, lm_calls_made=3, cache_hits=1, judgments=10, lm_seconds_per_verdict=1.0)
        return RunResult(name, "b", RECORDS, summarize(RECORDS), {}, {}, run=stats)

    def run_line(results):
        meta = {"data": ["d.jsonl"], "pairs": 5, "split": "test", "seed": 0}
        return next(line for line in summary_markdown(results, meta).splitlines() if line.startswith("Run:"))

    # two programs judged in one call share its pool and its 60 s
    assert run_line([run("p", 60.0), run("q", 60.0)]).startswith("Run: 20 judgments in 60 s (20.0 judgments per minute")
    # a bench that judges one program per call (bench/judge_quality.py) took the calls' sum
    assert run_line([run("p", 60.0), run("q", 120.0)]).startswith("Run: 20 judgments in 180 s")


def test_judging_summary_counts_verdicts_accuracy_and_cache():
    pairs = [Pair("p", "x", "y", label="A"), Pair("p", "x", "z", label="B"), Pair("p", "x", "w")]
    step = Analysis(text="t", preference="A", swapped=False, parsed=True, raw="", usage=Usage(1, 10, 2, 0.1))
    cached = Analysis(text="t", preference="A", swapped=False, parsed=True, raw="", usage=Usage(1, 10, 2), cached=True)
    unparsed = Analysis(text="", preference=None, swapped=False, parsed=False, raw="?", usage=Usage(1, 10, 2))
    judgments = [
        Judgment("A", analyses=(step, cached)),
        Judgment(None, analyses=(unparsed,), reason="unparsed"),
        Judgment("A", analyses=(cached,)),
    ]
    summary = summarize_judgments(pairs, judgments)
    assert (summary.judged, summary.verdicts, summary.no_verdict) == (3, 2, {"unparsed": 1})
    assert (summary.labelled, summary.correct, summary.accuracy) == (2, 1, 0.5)
    assert (summary.steps, summary.unparsed_steps, summary.cached_steps, summary.cached_judgments) == (4, 1, 2, 1)
    assert (summary.lm_calls, summary.prompt_tokens) == (2, 20)  # cached steps cost this run nothing


def test_record_maps_the_swapped_verdict_back():
    from reflectagent.pairs import Pair

    pair = Pair(prompt="p", response_a="a", response_b="b", id="7", label="A", category="c", source="s")
    step = Analysis(text="", preference="A", swapped=False, parsed=True, raw="", usage=Usage(1, 10, 5, 0.5))
    straight = Judgment(preference="A", analyses=(step,))
    swapped = Judgment(preference="B", analyses=(step,))  # "B" of the swapped pair is "A" of the original
    rec = Record.from_judgments(pair, straight, swapped)
    assert rec.verdicts == ("A", "A") and rec.lm_calls == 2 and rec.prompt_tokens == 20 and rec.steps == 2
    assert Record.from_dict(rec.to_dict()) == rec


def test_expected_calibration_error_and_its_bins_by_hand():
    # bin [0.9, 1.0]: 0.95 and 1.0 (P = 1 falls in the last bin), one labelled A: |0.975 - 0.5|; bin [0.2, 0.3): 0.25, not A
    cal = reliability([0.95, 1.0, 0.25], [True, False, False])
    assert cal.n == 3 and cal.ece == pytest.approx((2 * 0.475 + 0.25) / 3)
    last, low = cal.bins[9], cal.bins[2]
    assert (last.count, last.mean_probability, last.frequency) == (2, pytest.approx(0.975), 0.5)
    assert (low.count, low.frequency) == (1, 0.0) and cal.bins[5].count == 0 and cal.bins[5].frequency is None
    assert reliability([], []).ece is None


def test_a_record_keeps_each_presentation_s_p_a_in_the_original_order_and_the_summary_its_ece():
    pair = Pair(prompt="p", response_a="a", response_b="b", id="7", label="A")
    straight, swapped = Judgment(preference="A", probability_a=0.8), Judgment(preference="B", probability_a=0.3)
    rec = Record.from_judgments(pair, straight, swapped)
    assert rec.probabilities == (0.8, pytest.approx(0.7))  # the swapped judgment's P(A) is the original B's
    unlabelled = Record.from_judgments(
        Pair(prompt="p", response_a="a", response_b="c"), straight, Judgment(preference=None)
    )
    summary = summarize([rec, unlabelled])
    assert summary.calibration.n == 2 and summary.calibration.ece == pytest.approx(0.25)  # (0.2 + 0.3) / 2
    assert Summary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    old = summary.to_dict()
    del old["calibration"]  # report.json written before ECE was measured
    assert Summary.from_dict(old).calibration is None
    row = rec.to_dict()
    del row["probabilities"]
    assert Record.from_dict(row).probabilities == (None, None)


def test_the_report_draws_reliability_and_a_curve_per_thresholded_program(tmp_path):
    from reflectagent.eval import write_report
    from reflectagent.eval.report import curves

    def run(name, p, calls):
        records = [
            Record(
                pair_id=str(i),
                category="c",
                source="s",
                label="BAAB"[i],
                verdicts=(v, v),
                reasons=(None, None),
                steps=2,
                unparsed_steps=0,
                lm_calls=calls,
                prompt_tokens=10,
                completion_tokens=1,
                probabilities=(q, q),
            )
            for i, (v, q) in enumerate((("A" if x > 0.5 else "B", x) for x in p))
        ]
        return RunResult(name, "b", records, summarize(records), {}, {})

    results = [
        run("direct-prob", [0.7, 0.4, 0.6, 0.2], 4),
        run("escalating-prob:0.2", [0.3, 0.6, 0.8, 0.1], 10),
        run("escalating-prob:0.05", [0.3, 0.4, 0.6, 0.1], 6),
        run("mtbench", [0.5] * 4, 4),
    ]
    assert curves(results) == {("escalating-prob", "b"): [(3.0, 0.75, 0.05), (5.0, 1.0, 0.2)]}
    folder = write_report(results, tmp_path / "r", {"data": ["d"], "pairs": 4, "split": "test", "seed": 0})
    assert (folder / "plots" / "reliability.png").stat().st_size > 5000
    assert "![reliability of P(A)](plots/reliability.png)" in (folder / "report.md").read_text()
    header = next(line for line in (folder / "report.md").read_text().splitlines() if line.startswith("| program"))
    assert "| ECE |" in header
    html = (folder / "report.html").read_text()
    assert "<th>ECE</th>" in html and 'alt="reliability"' in html  # the page's summary and its plots
