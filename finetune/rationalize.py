"""GenRM's rationalisation: when no sampled analysis reached the labelled verdict, the teacher
is told the answer and asked to justify it. Rows made this way are marked, and can be left out.
"""

from __future__ import annotations

from typing import Literal

import dspy

from reflectagent.calling.steps import run_step
from reflectagent.judging.modules import render_analysis
from reflectagent.judging.signatures import Analyze
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis


class RationalizeAnalysis(dspy.Signature):
    """Response `better` is known to be the better one. Write the short analysis a careful judge
    would write to reach that verdict: check instruction following, correctness, helpfulness and
    harmlessness; do not mention that the answer was given."""

    prompt: str = dspy.InputField()
    response_a: str = dspy.InputField()
    response_b: str = dspy.InputField()
    better: Literal["A", "B"] = dspy.InputField()
    analysis: str = dspy.OutputField(desc="a brief comparison of the decisive differences")


class RationalizeReflection(dspy.Signature):
    """Analysis `more_reliable` is known to be the more reliable of the two. Write the reflection a
    careful judge would write to reach that conclusion, checking both analyses against the responses;
    do not mention that the answer was given."""

    prompt: str = dspy.InputField()
    response_a: str = dspy.InputField()
    response_b: str = dspy.InputField()
    analysis_1: str = dspy.InputField()
    analysis_2: str = dspy.InputField()
    more_reliable: Literal["1", "2"] = dspy.InputField()
    reflection: str = dspy.OutputField(desc="where each analysis is right or wrong about the responses")


class Rationalizer(dspy.Module):
    """Teacher-forced analyses and reflections, through the judgment cache like every step."""

    def __init__(self):
        super().__init__()
        self.analysis = dspy.Predict(RationalizeAnalysis)
        self.reflection = dspy.Predict(RationalizeReflection)

    def analyse(self, pair: Pair, swapped: bool) -> Analysis | None:
        """An analysis of the pair as shown (swapped or not) that argues for the label."""
        shown = pair.swapped() if swapped else pair
        step = run_step(self.analysis, {**shown.inputs(), "better": shown.label})
        if not step.parsed or not step.fields["analysis"].strip():
            return None
        return Analysis(
            text=step.fields["analysis"],
            preference=pair.label,
            swapped=swapped,
            parsed=True,
            raw=step.raw,
            usage=step.usage,
            cached=step.cached,
        )

    def reflect(self, pair: Pair, first: Analysis, second: Analysis, more_reliable: str) -> str | None:
        inputs = {
            **pair.inputs(),
            "analysis_1": render_analysis(first, False),
            "analysis_2": render_analysis(second, False),
            "more_reliable": more_reliable,
        }
        step = run_step(self.reflection, inputs)
        return step.fields["reflection"] if step.parsed and step.fields["reflection"].strip() else None


__all__ = ["Analyze", "RationalizeAnalysis", "RationalizeReflection", "Rationalizer"]
