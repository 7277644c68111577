"""The smallest judge that is honest about position bias: one analysis in each order, a verdict only when the two
agree (or, by probability, from their average)."""

from __future__ import annotations

import asyncio

from reflectagent.judging.base import Judge
from reflectagent.judging.decisions import Decision, check_decision, order_averaged_probability, probability_verdict
from reflectagent.judging.modules import Analyzer
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment


class PositionSwapJudge(Judge):
    """One analysis in each order. ``decision="vote"``: the verdict when both parse and agree, none
    otherwise; ``"probability"``: the order-averaged P(A) from the verdict tokens decides."""

    def __init__(self, decision: Decision = "vote"):
        check_decision(decision)
        super().__init__(decision=decision)
        self.decision = decision
        self.analyzer = Analyzer()

    async def adecide(self, pair: Pair) -> Judgment:
        analyses = tuple(
            await asyncio.gather(self.analyzer.acall(pair, swapped=False), self.analyzer.acall(pair, swapped=True))
        )
        probability_a = order_averaged_probability(analyses)
        if self.decision == "probability":
            preference, reason = probability_verdict(probability_a)
            return Judgment(preference=preference, analyses=analyses, reason=reason, probability_a=probability_a)
        if not all(a.parsed for a in analyses):
            return Judgment(preference=None, analyses=analyses, reason="unparsed")
        if len({a.preference for a in analyses}) > 1:
            return Judgment(
                preference=None, analyses=analyses, reason="inconsistent across orders", probability_a=probability_a
            )
        return Judgment(preference=analyses[0].preference, analyses=analyses, probability_a=probability_a)
