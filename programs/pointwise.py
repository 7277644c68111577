"""Pointwise judging: each response rated on its own, the higher score preferred.

A pairwise prompt lets a small model lean on position (the 1.5B preset picks the second response
with P about 0.85 whichever it is); rated alone, a response has no position to be favoured for.
``decision="probability"`` scores each response by its expected rating under the rating token's
probabilities (G-Eval, Liu et al., 2023), which separates two responses the generated digit calls
equal; ``"vote"`` compares the generated digits. Equal scores give no verdict. ``rationale=True``
writes an assessment of the response before its rating (``Assess``), so a reader sees why. The two ratings are
independent steps, so the same response rated for another pair or presentation comes from the cache,
and the scores are usable as group rewards (``reflectagent.programs.ranking``).
"""

from __future__ import annotations

import asyncio
import math

from reflectagent.judging.base import Judge
from reflectagent.judging.decisions import Decision, check_decision
from reflectagent.judging.modules import Rater
from reflectagent.judging.signatures import Assess, Rate
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment


def preference_probability(score_a: float, score_b: float) -> float:
    """P(A better) from two scores, Bradley-Terry style with one rating point as the unit."""
    return 1.0 / (1.0 + math.exp(score_b - score_a))


class PointwiseJudge(Judge):
    """Rate A and B separately; prefer the higher score (``decision``: ``"probability"`` or ``"vote"``)."""

    def __init__(self, decision: Decision = "probability", rationale: bool = False):
        check_decision(decision)
        super().__init__(decision=decision, **({"rationale": True} if rationale else {}))
        self.rater = Rater(Assess if rationale else Rate)

    async def adecide(self, pair: Pair) -> Judgment:
        ratings = tuple(await asyncio.gather(self.rater.acall(pair, "A"), self.rater.acall(pair, "B")))
        if not all(r.parsed for r in ratings):
            return Judgment(preference=None, ratings=ratings, reason="unparsed")
        by_probability = self.options["decision"] == "probability"
        score_a, score_b = (r.score if by_probability else r.rating for r in ratings)
        if score_a is None or score_b is None:
            return Judgment(preference=None, ratings=ratings, reason="no verdict probabilities")
        probability_a = preference_probability(score_a, score_b) if by_probability else None
        if score_a == score_b:
            return Judgment(preference=None, ratings=ratings, reason="tied ratings", probability_a=probability_a)
        return Judgment(preference="A" if score_a > score_b else "B", ratings=ratings, probability_a=probability_a)
