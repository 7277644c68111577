"""ReflectRM (Qin et al., 2026): analyses in both orders, then reflection picks the reliable one.

Stage 1 samples k analyses, alternating the order the pair is shown in. Stage 2 asks the
same model to compare every two parsed analyses, each comparison in both orders of the
analyses, so the reflector's own position bias cancels; the analysis that wins the most
reflections is the most reliable, and its verdict is final.

Ties between most-reliable analyses are broken by this rule, in order: (1) if the tied
analyses share a verdict, that verdict; (2) otherwise the verdict of the tied analysis with
the higher verdict probability, when the backend gives probabilities and they differ;
(3) otherwise no verdict (reason ``"reflection tie"``).

``adaptive=True`` (our addition) skips stage 2 when all parsed analyses agree: reflection
could only pick among analyses with that same verdict, so the result is identical to the
full program's on the same samples, at the cost of stage 1 alone.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations

from reflectagent.concurrency import run_all
from reflectagent.judge import Judge, order_averaged_probability
from reflectagent.programs.genrm import analyse
from reflectagent.modules import Analyzer, Reflector
from reflectagent.pairs import Pair
from reflectagent.results import Analysis, Judgment, Reflection


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


class ReflectRM(Judge):
    """Two-stage judge: ``samples`` analyses, then pairwise reflection (skipped if ``adaptive`` and unanimous)."""

    def __init__(self, samples: int = 2, adaptive: bool = False, temperature: float = 0.7):
        if samples < 2:
            raise ValueError("ReflectRM needs at least 2 analyses to reflect on")
        super().__init__(samples=samples, adaptive=adaptive, temperature=temperature)
        self.analyzer = Analyzer()
        self.reflector = Reflector()

    def decide(self, pair: Pair) -> Judgment:
        analyses = analyse(self.analyzer, pair, stage1_plan(self.options["samples"]), self.options["temperature"])
        parsed = [i for i, a in enumerate(analyses) if a.parsed]
        unanimous = len({analyses[i].preference for i in parsed}) <= 1
        reflections: tuple[Reflection, ...] = ()
        notes: tuple[str, ...] = ()
        if self.options["adaptive"] and unanimous:
            notes = ("stage 2 skipped: the analyses agree",)
        else:
            comparisons = [*combinations(parsed, 2), *((j, i) for i, j in combinations(parsed, 2))]
            reflections = tuple(run_all([
                (lambda a=first, b=second: self.reflector(pair, analyses, first=a, second=b)) for first, second in comparisons
            ]))
        winner, reason = most_reliable(analyses, reflections)
        return Judgment(
            preference=analyses[winner].preference if winner is not None else None,
            analyses=analyses, reflections=reflections, reason=reason, notes=notes, chosen=winner,
            probability_a=order_averaged_probability(analyses),
        )


def AdaptiveReflectRM(samples: int = 2, temperature: float = 0.7) -> ReflectRM:  # noqa: N802 - reads as a class
    """ReflectRM that reflects only when its analyses disagree (same verdicts, fewer calls)."""
    return ReflectRM(samples=samples, adaptive=True, temperature=temperature)
