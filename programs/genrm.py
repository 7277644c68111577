"""GenRM (Mahan et al., 2024): a chain-of-thought rationale, then a preference token.

Options cover the paper's inference variants: both orders (cancels position bias),
k samples with a majority vote (self-consistency), and the original scoring by the
verdict token's probability, averaged over the analyses (and so over both orders).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from reflectagent.judging.base import Judge
from reflectagent.judging.decisions import Decision, check_decision, order_averaged_probability, probability_verdict
from reflectagent.judging.modules import Analyzer
from reflectagent.judging.signatures import Analyze, Prefer
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis, Judgment


def sample_plan(samples: int, both_orders: bool) -> list[tuple[bool, int]]:
    """(swapped, sample index) for each analysis. Sample 0 is greedy at the backend's settings."""
    orders = (False, True) if both_orders else (False,)
    return [(swapped, sample) for sample in range(samples) for swapped in orders]


async def analyse(
    analyzer: Analyzer, pair: Pair, plan: list[tuple[bool, int]], temperature: float
) -> tuple[Analysis, ...]:
    """All planned analyses at once; samples after the first are drawn at ``temperature``."""
    return tuple(
        await asyncio.gather(
            *(
                analyzer.acall(pair, swapped=swapped, sample=sample, temperature=temperature if sample else None)
                for swapped, sample in plan
            )
        )
    )


def majority(analyses: tuple[Analysis, ...]) -> tuple[str | None, str | None]:
    """The most common parsed verdict, or (None, reason) when none parsed or the vote is tied."""
    votes = Counter(a.preference for a in analyses if a.parsed)
    if not votes:
        return None, "unparsed"
    (top, count), *rest = votes.most_common()
    if rest and rest[0][1] == count:
        return None, "inconsistent across orders" if len(analyses) == 2 else "tied vote"
    return top, None


class GenRM(Judge):
    """Analysis then verdict; ``decision="vote"`` (majority) or ``"probability"`` (P(A) > 0.5).

    A tied vote gives no verdict; so does P(A) of exactly 0.5, or a missing probability (an unparsed analysis)
    under the probability rule. That rule needs the backend's log-probs (vLLM gives them): on a backend that does
    not ask for them, or a server that ignores the request, judging stops with ``LogprobsUnavailable``.
    ``rationale=False`` asks for the verdict alone (``Prefer``): GenRM's direct baseline, and with
    the probability rule the scoring that suits a small model whose rationales are mostly noise.
    """

    def __init__(
        self,
        samples: int = 1,
        both_orders: bool = False,
        decision: Decision = "vote",
        temperature: float = 0.7,
        rationale: bool = True,
    ):
        if samples < 1:
            raise ValueError("samples must be at least 1")
        check_decision(decision)
        super().__init__(
            samples=samples,
            both_orders=both_orders,
            decision=decision,
            temperature=temperature,
            **({} if rationale else {"rationale": False}),
        )
        self.analyzer = Analyzer(Analyze if rationale else Prefer)

    async def adecide(self, pair: Pair) -> Judgment:
        options = self.options
        analyses = await analyse(
            self.analyzer, pair, sample_plan(options["samples"], options["both_orders"]), options["temperature"]
        )
        probability_a = order_averaged_probability(analyses)
        if options["decision"] == "probability":
            preference, reason = probability_verdict(probability_a)
        else:
            preference, reason = majority(analyses)
        return Judgment(preference=preference, analyses=analyses, reason=reason, probability_a=probability_a)
