"""Judgments written by a strong model, read from a file: a teacher for training data and demos.

One JSON object a line, the pair schema plus ``teacher_analysis`` and ``teacher_preference``
("A", "B" or "tie"), optionally ``teacher`` and ``prompt_also_in`` (``shared/data/teacher``).
Such files usually carry no human label: the teacher's preference is then the pair's label, and
whatever is built from them says so. The teacher's analysis names the responses "Response A"
and "Response B" in the order written, so the same analysis can be shown for the swapped pair
by exchanging the two names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from reflectagent.records.pairs import InvalidPair, Pair, parse_pair
from reflectagent.records.reading import DEFAULT_LIMITS, BadLine, BadLines, ReadLimits, iter_records
from reflectagent.records.results import Analysis, swap_names


@dataclass(frozen=True)
class TeacherJudgment:
    pair: Pair  # its label is the teacher's preference where the file has no human label
    analysis: str
    preference: str  # "A", "B" or "tie"
    teacher: str = ""
    prompt_also_in: tuple[str, ...] = ()  # benchmark sets that share this prompt (keep them out of their tests)

    def as_analysis(self, swapped: bool = False) -> Analysis:
        """The teacher's analysis as a parsed step, shown in either order (verdict in the original order)."""
        text = swap_names(self.analysis) if swapped else self.analysis
        return Analysis(
            text=text,
            preference=self.preference if self.preference in ("A", "B") else None,
            swapped=swapped,
            parsed=True,
            raw=text,
            sample=-1,
        )


def parse_teacher(row: object) -> TeacherJudgment:
    """One teacher judgment from a JSON value, or an :class:`InvalidPair` with the reason (the pair's fields are
    checked as :func:`parse_pair` checks them; ``teacher`` is text and ``prompt_also_in`` a list of names)."""
    if not isinstance(row, dict):
        raise InvalidPair(f"expected a JSON object, got {type(row).__name__}")
    analysis, preference = row.get("teacher_analysis"), row.get("teacher_preference")
    if not isinstance(analysis, str) or not analysis.strip():
        raise InvalidPair("missing teacher_analysis")
    if preference not in ("A", "B", "tie"):
        shown = repr(preference) if isinstance(preference, str) or preference is None else type(preference).__name__
        raise InvalidPair(f"teacher_preference must be A, B or tie, got {shown[:60]}")
    teacher, also_in = row.get("teacher", ""), row.get("prompt_also_in") or []
    if not isinstance(teacher, str):
        raise InvalidPair(f"teacher must be text, got {type(teacher).__name__}")
    if not isinstance(also_in, list) or not all(isinstance(name, str) for name in also_in):
        raise InvalidPair("prompt_also_in must be a list of benchmark names (text)")
    pair = parse_pair(row)
    if pair.label is None:
        pair = replace(pair, label=preference)
    return TeacherJudgment(
        pair=pair, analysis=analysis.strip(), preference=preference, teacher=teacher, prompt_also_in=tuple(also_in)
    )


def read_teacher(
    path: str | Path, *, exclude_prompts: Iterable[str] = (), limits: ReadLimits = DEFAULT_LIMITS
) -> tuple[list[TeacherJudgment], list[BadLine]]:
    """The judgments of a teacher file, bad lines reported, and none whose prompt is in ``exclude_prompts``
    (the prompts of an evaluation split: a judge that saw a prompt with a verdict is not tested on unseen work).
    Read as pairs are (:func:`reflectagent.records.reading.iter_records`): within ``limits``, every bad line named."""
    excluded = {p.strip() for p in exclude_prompts}
    judgments, bad = [], []
    report = BadLines(Path(path), limits, bad.append)
    for number, row in iter_records(Path(path), report, limits):
        try:
            judgment = parse_teacher(row)
        except InvalidPair as exc:
            report(BadLine(str(path), number, str(exc)))
            continue
        if judgment.pair.prompt.strip() not in excluded:
            judgments.append(judgment)
    return judgments, bad
