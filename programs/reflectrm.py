"""ReflectRM (Qin et al., 2026): analyses in both orders, then reflection picks the reliable one.

Stage 1 samples k analyses, alternating the order the pair is shown in. Stage 2 asks the
same model to compare every two parsed analyses, each comparison in both orders of the
analyses, so the reflector's own position bias cancels; the analysis that wins the most
reflections is the most reliable, and its verdict is final.

Ties between most-reliable analyses are broken by this rule, in order: (1) if the tied
analyses share a verdict, that verdict; (2) otherwise the verdict of the tied analysis with
the higher verdict probability, when the backend gives probabilities and they differ;
(3) otherwise no verdict (reason ``"reflection tie"``).

``AdaptiveReflectRM`` (``adaptive=True``, our addition) skips stage 2 when all parsed
analyses agree: reflection could only pick among analyses with that same verdict, so the
result is identical to the full program's on the same samples, at the cost of stage 1 alone.

``decision="probability"`` (our extension, beside the paper's vote): small models carry their
judgment in token probabilities more than in the letters they generate, and a reflector can
be position-locked (always "1") while its probabilities still lean the right way. Each
reflection gives P(analysis_1 is more reliable) from its choice token; every two analyses are
reflected on in both orders, so summing those soft wins averages out the reflector's position
bias. An analysis's weight is its share of the soft wins (a reflection without a probability
carries none; equal weights when none has one), and P(A) is the weighted mean of the analyses' own P(A): with equal weights it is GenRM's
order-averaged probability, with all weight on one analysis it is that analysis's. A if
P(A) > 0.5, B if below, no verdict at exactly 0.5 or where a probability is missing. The
adaptive skip stays exact: under this rule stage 2 is skipped only when every analysis's P(A)
is on the same side of 0.5, where no weighting can change the verdict.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from itertools import combinations

from reflectagent.judging.base import Judge
from reflectagent.judging.decisions import Decision, check_decision, order_averaged_probability, probability_verdict
from reflectagent.judging.modules import Analyzer, Reflector
from reflectagent.programs.genrm import analyse
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis, Judgment, Reflection


def stage1_plan(samples: int) -> list[tuple[bool, int]]:
    """Analysis i is shown swapped when i is odd; sample index i // 2 (so k=2 is one per order)."""
    return [(i % 2 == 1, i // 2) for i in range(samples)]


def most_reliable(analyses: tuple[Analysis, ...], reflections: tuple[Reflection, ...]) -> tuple[int | None, str | None]:
    """Index of the analysis whose verdict is final, or (None, reason); see the module's tie rule."""
    parsed = [i for i, a in enumerate(analyses) if a.parsed]
    if not parsed:
        return None, "unparsed"
    wins = Counter({i: 0 for i in parsed})
    wins.update(r.more_reliable for r in reflections if r.more_reliable is not None)
    best = max(wins.values())
    tied = [i for i in parsed if wins[i] == best]
    if len({analyses[i].preference for i in tied}) == 1:
        return tied[0], None
    probabilities = [(analyses[i].probability, i) for i in tied]
    if all(p is not None for p, _ in probabilities):
        ranked = sorted(probabilities, reverse=True)
        if ranked[0][0] > ranked[1][0]:
            return ranked[0][1], None
    return None, "reflection tie"


def probability_a_of(analysis: Analysis) -> float | None:
    if not analysis.parsed or analysis.probability is None:
        return None
    return analysis.probability if analysis.preference == "A" else 1 - analysis.probability


def reliability_weights(analyses: tuple[Analysis, ...], reflections: tuple[Reflection, ...]) -> dict[int, float] | None:
    """Each parsed analysis's share of soft reflection wins; None without a parsed analysis.

    A reflection with no probability (unparsed, or no log-probs) carries no weight; with none that
    has one, the analyses weigh equally. So every weighting is a convex one, whatever failed.
    """
    parsed = [i for i, a in enumerate(analyses) if a.parsed]
    weighed = [r for r in reflections if r.probability_first is not None]
    if not parsed:
        return None
    if not weighed:
        return {i: 1 / len(parsed) for i in parsed}
    wins = dict.fromkeys(parsed, 0.0)
    for r in weighed:
        wins[r.first] += r.probability_first
        wins[r.second] += 1 - r.probability_first
    total = sum(wins.values())
    return {i: w / total for i, w in wins.items()}


def weighted_probability(
    analyses: tuple[Analysis, ...], reflections: tuple[Reflection, ...]
) -> tuple[float | None, int | None]:
    """P(A) as the reliability-weighted mean of the analyses' own P(A), and the heaviest analysis."""
    weights = reliability_weights(analyses, reflections)
    if weights is None or any(probability_a_of(analyses[i]) is None for i in weights):
        return None, None
    heaviest = max(weights, key=lambda i: (weights[i], -i))
    return sum(w * probability_a_of(analyses[i]) for i, w in weights.items()), heaviest


def settled(analyses: tuple[Analysis, ...], decision: Decision) -> bool:
    """Whether reflection cannot change the verdict (the adaptive skip): the parsed analyses agree,
    by verdict under the vote, by the side of 0.5 their P(A) is on under the probability rule."""
    parsed = [a for a in analyses if a.parsed]
    if decision == "vote":
        return len({a.preference for a in parsed}) <= 1
    sides = {None if p is None or p == 0.5 else p > 0.5 for p in map(probability_a_of, parsed)}
    return len(sides) == 1 and None not in sides


class ReflectRM(Judge):
    """Two-stage judge: ``samples`` analyses, then pairwise reflection (skipped if ``adaptive`` and settled)."""

    def __init__(self, samples: int = 2, adaptive: bool = False, temperature: float = 0.7, decision: Decision = "vote"):
        if samples < 2:
            raise ValueError("ReflectRM needs at least 2 analyses to reflect on")
        check_decision(decision)
        super().__init__(samples=samples, adaptive=adaptive, temperature=temperature, decision=decision)
        self.adaptive = adaptive
        self.decision = decision
        self.analyzer = Analyzer()
        self.reflector = Reflector()

    async def adecide(self, pair: Pair) -> Judgment:
        analyses = await analyse(self.analyzer, pair, stage1_plan(self.options["samples"]), self.options["temperature"])
        parsed = [i for i, a in enumerate(analyses) if a.parsed]
        reflections: tuple[Reflection, ...] = ()
        notes: tuple[str, ...] = ()
        if self.adaptive and settled(analyses, self.decision):
            notes = ("stage 2 skipped: the analyses agree",)
        else:
            comparisons = [*combinations(parsed, 2), *((j, i) for i, j in combinations(parsed, 2))]
            reflections = tuple(
                await asyncio.gather(
                    *(self.reflector.acall(pair, analyses, first=first, second=second) for first, second in comparisons)
                )
            )
        if self.decision == "probability":
            probability_a, heaviest = weighted_probability(analyses, reflections)
            preference, reason = probability_verdict(probability_a)
            if reflections and all(r.probability_first is None for r in reflections):
                notes += ("no reflection carried a probability: the analyses weighed equally",)
            return Judgment(
                preference=preference,
                analyses=analyses,
                reflections=reflections,
                reason=reason,
                notes=notes,
                chosen=heaviest,
                probability_a=probability_a,
            )
        winner, reason = most_reliable(analyses, reflections)
        return Judgment(
            preference=analyses[winner].preference if winner is not None else None,
            analyses=analyses,
            reflections=reflections,
            reason=reason,
            notes=notes,
            chosen=winner,
            probability_a=order_averaged_probability(analyses),
        )


class AdaptiveReflectRM(ReflectRM):
    """ReflectRM that reflects only when its analyses disagree (same verdicts, fewer calls)."""

    def __init__(self, samples: int = 2, temperature: float = 0.7, decision: Decision = "vote"):
        super().__init__(samples=samples, adaptive=True, temperature=temperature, decision=decision)
        del self.options["adaptive"]  # implied by the class: a saved file holds what the constructor takes
