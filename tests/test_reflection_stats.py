"""bench/reflection_stats.py reads a saved run's reflections: whether the reflector picked the right analysis
where two disagree, and how often it picked the one shown first. Checked on judgments whose answers are known."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "reflection_stats.py"
spec = importlib.util.spec_from_file_location("reflection_stats", SCRIPT)
reflection_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reflection_stats)


def saved(pair_id: str, label: str, picks) -> dict:
    """One pair judged in both presentations; analysis 0 reaches the label's verdict in each, analysis 1 the
    other; each judgment reflects on both orders, and ``picks(first, second)`` says which index it chose."""
    flip = {"A": "B", "B": "A"}
    judgments = []
    for shown in (0, 1):
        truth = label if shown == 0 else flip[label]
        analyses = [{"preference": truth, "parsed": True}, {"preference": flip[truth], "parsed": True}]
        reflections = [
            {"first": f, "second": s, "more_reliable": picks(f, s), "parsed": True, "probability_first": 0.8}
            for f, s in ((0, 1), (1, 0))
        ]
        judgments.append({"analyses": analyses, "reflections": reflections})
    return {"program": "reflectrm-prob", "pair": {"id": pair_id, "label": label}, "judgments": judgments}


@pytest.mark.parametrize(
    ("picks", "first_shown", "right", "expected_right"),
    [
        (lambda f, s: f, 1.0, 0.5, 0.5),  # position-locked: the first shown, right in one order of two
        (
            lambda f, s: 0,
            0.5,
            1.0,
            0.5,
        ),  # always the right analysis, whatever its place; its probability still by place
    ],
)
def test_reflections_are_scored_by_the_analysis_chosen_and_its_place(
    tmp_path, picks, first_shown, right, expected_right
):
    with gzip.open(tmp_path / "judgments.jsonl.gz", "wt") as f:
        for i, label in enumerate("ABAB"):
            f.write(json.dumps(saved(f"p{i}", label, picks)) + "\n")
    with gzip.open(tmp_path / "judgments.jsonl.gz", "rt") as f:
        rows = reflection_stats.reflection_rows([json.loads(line) for line in f])
    got = reflection_stats.stats(rows["reflectrm-prob"])
    assert got["reflections"] == got["deciding"] == 16
    assert got["chose_first_shown"] == first_shown
    assert got["picked_right"] == right
    assert got["expected_right_by_probability"] == pytest.approx(expected_right)
