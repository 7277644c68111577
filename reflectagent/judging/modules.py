"""The smallest composable judge steps, each a ``dspy.Module`` around one ``Predict``.

An ``Analyzer`` can be shown the pair swapped and maps the verdict back, so callers only
ever see the original order; a ``Reflector`` names the more reliable of two analyses; a
``VerdictStep`` turns an analysis into a preference; a ``Rater`` scores one response on its own. Programs compose these; optimisers
see their predictors; every call goes through :func:`reflectagent.calling.steps.arun_step`. Each is
async first (``aforward``, what ``await module.acall(...)`` runs); ``forward`` runs it from sync code.
"""

from __future__ import annotations

import dspy

from reflectagent.calling.concurrency import run_sync
from reflectagent.calling.steps import arun_step
from reflectagent.judging.signatures import Analyze, Rate, Reflect, Verdict
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis, Rating, Reflection, StepOutput, flip, swap_names


def render_analysis(analysis: Analysis, swapped: bool) -> str:
    """An analysis as text for a later step, named in the order that step sees: its verdict, and, for one written
    with the pair the other way round, the responses' names in its text (else a reflection would read "response_a
    is better" above "Verdict: B" of one analysis in three of a ReflectRM judgment)."""
    verdict = flip(analysis.preference) if swapped else analysis.preference
    text = analysis.text if analysis.swapped == swapped else swap_names(analysis.text)
    return f"{text}\nVerdict: {verdict or 'none'}"


def analysis_from(step: StepOutput, swapped: bool, sample: int, text: str) -> Analysis:
    """An ``Analysis`` from a step whose output has a ``preference``, mapped to the original order."""
    preference = (step.fields or {}).get("preference")
    probability = (step.logprobs or {}).get("preference", {}).get(preference) if preference else None
    return Analysis(
        text=text,
        preference=flip(preference) if swapped else preference,
        swapped=swapped,
        parsed=step.parsed,
        raw=step.raw,
        sample=sample,
        probability=probability,
        error=step.error,
        usage=step.usage,
        cached=step.cached,
        truncated=step.truncated,
    )


class Analyzer(dspy.Module):
    """Analyze one pair, optionally in swapped order; the verdict comes back in the original order."""

    def __init__(self, signature: type[dspy.Signature] = Analyze):
        super().__init__()
        self.predict = dspy.Predict(signature)

    async def aforward(
        self, pair: Pair, swapped: bool = False, sample: int = 0, temperature: float | None = None
    ) -> Analysis:
        shown = pair.swapped() if swapped else pair
        step = await arun_step(self.predict, shown.inputs(), sample=sample, config={"temperature": temperature})
        return analysis_from(step, swapped, sample, text=(step.fields or {}).get("analysis", ""))

    def forward(self, *args, **kwargs) -> Analysis:
        return run_sync(self.aforward(*args, **kwargs))


class Reflector(dspy.Module):
    """Compare two analyses of the same pair and name the more reliable one."""

    def __init__(self, signature: type[dspy.Signature] = Reflect):
        super().__init__()
        self.predict = dspy.Predict(signature)

    async def aforward(
        self,
        pair: Pair,
        analyses: tuple[Analysis, ...],
        first: int,
        second: int,
        swapped: bool = False,
        sample: int = 0,
        temperature: float | None = None,
    ) -> Reflection:
        """``first`` and ``second`` index ``analyses``; ``swapped`` shows the pair in B, A order."""
        shown = pair.swapped() if swapped else pair
        inputs = {
            **shown.inputs(),
            "analysis_1": render_analysis(analyses[first], swapped),
            "analysis_2": render_analysis(analyses[second], swapped),
        }
        step = await arun_step(self.predict, inputs, sample=sample, config={"temperature": temperature})
        fields = step.fields or {}
        choice = fields.get("more_reliable")
        return Reflection(
            text=fields.get("reflection", ""),
            first=first,
            second=second,
            more_reliable={"1": first, "2": second}.get(choice),
            parsed=step.parsed,
            raw=step.raw,
            probability_first=(step.logprobs or {}).get("more_reliable", {}).get("1") if step.parsed else None,
            error=step.error,
            usage=step.usage,
            cached=step.cached,
            truncated=step.truncated,
        )

    def forward(self, *args, **kwargs) -> Reflection:
        return run_sync(self.aforward(*args, **kwargs))


class VerdictStep(dspy.Module):
    """Give the final preference for a pair from an analysis written elsewhere."""

    def __init__(self, signature: type[dspy.Signature] = Verdict):
        super().__init__()
        self.predict = dspy.Predict(signature)

    async def aforward(self, pair: Pair, analysis: Analysis, swapped: bool = False, sample: int = 0) -> Analysis:
        shown = pair.swapped() if swapped else pair
        inputs = {**shown.inputs(), "analysis": render_analysis(analysis, swapped)}
        step = await arun_step(self.predict, inputs, sample=sample)
        return analysis_from(step, swapped, sample, text=analysis.text)

    def forward(self, *args, **kwargs) -> Analysis:
        return run_sync(self.aforward(*args, **kwargs))


def expected_rating(probabilities: dict[str, float] | None) -> float | None:
    """The mean rating under the rating token's distribution (G-Eval's score): finer than the generated digit."""
    if not probabilities:
        return None
    return sum(int(choice) * p for choice, p in probabilities.items())


class Rater(dspy.Module):
    """Rate one response of a pair (``"A"`` or ``"B"``) on its own: the model never sees the other one."""

    def __init__(self, signature: type[dspy.Signature] = Rate):
        super().__init__()
        self.predict = dspy.Predict(signature)

    async def aforward(self, pair: Pair, response: str, sample: int = 0, temperature: float | None = None) -> Rating:
        inputs = {"prompt": pair.prompt, "response": {"A": pair.response_a, "B": pair.response_b}[response]}
        step = await arun_step(self.predict, inputs, sample=sample, config={"temperature": temperature})
        generated = (step.fields or {}).get("rating")
        return Rating(
            response=response,
            rating=int(generated) if generated is not None else None,
            parsed=step.parsed,
            raw=step.raw,
            score=expected_rating((step.logprobs or {}).get("rating")) if step.parsed else None,
            text=(step.fields or {}).get("assessment", ""),
            sample=sample,
            error=step.error,
            usage=step.usage,
            cached=step.cached,
            truncated=step.truncated,
        )

    def forward(self, *args, **kwargs) -> Rating:
        return run_sync(self.aforward(*args, **kwargs))
