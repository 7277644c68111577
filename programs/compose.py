"""Judges made of judges: a vote across backends, and a cascade that escalates when unsure.

Each member is a judge program with its own backend (a configured name, a ``dspy.LM``, or
None for whatever LM is in context), so a cheap local model and a strong API model can
judge the same pair. Member judgments are kept in ``Judgment.parts``.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import dspy

from reflectagent.calling.backends import resolve_backend
from reflectagent.judging.base import Judge
from reflectagent.judging.decisions import Decision, check_decision, probability_verdict
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment

Member = tuple[Judge, "str | dspy.BaseLM | None"]


def _bind(members) -> tuple[list[Judge], list[dict]]:
    """Give each member judge its backend; return the judges and their saveable specs."""
    from reflectagent.programs import program_class

    judges, specs = [], []
    for member in members:
        if isinstance(member, dict):  # a spec from a saved file
            judge, backend = program_class(member["program"])(**member["options"]), member["backend"]
        else:
            judge, backend = member
        lm = resolve_backend(backend) if isinstance(backend, str) else backend
        if lm is not None:
            judge.set_lm(lm)
        judges.append(judge)
        specs.append(
            {
                "program": type(judge).__name__,
                "options": judge.options,
                "backend": backend if isinstance(backend, str) else None,
            }
        )
    return judges, specs


class _Composite(Judge):
    """A judge of member judges, each bound to its backend; saved as their specs."""

    def __init__(self, members: list, **options):
        judges, specs = _bind(members)
        if len(judges) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two members")
        super().__init__(members=specs, **options)
        self.members = judges


class Ensemble(_Composite):
    """Member judges combined. ``decision="vote"``: a majority vote; members without a verdict abstain
    and a tied vote gives none. ``"probability"``: the mean of the members' P(A), so two members that
    disagree are settled by the surer one instead of cancelling out; every member must give a P(A).
    """

    def __init__(self, members: list, decision: Decision = "vote"):
        check_decision(decision)
        super().__init__(members, **({"decision": decision} if decision != "vote" else {}))

    async def adecide(self, pair: Pair) -> Judgment:
        parts = tuple(await asyncio.gather(*(judge.ajudge(pair) for judge in self.members)))
        if self.options.get("decision") == "probability":
            missing = [i for i, p in enumerate(parts) if p.probability_a is None]
            if missing:
                return Judgment(preference=None, parts=parts, reason=f"no P(A) from member(s) {missing}")
            probability_a = sum(p.probability_a for p in parts) / len(parts)
            preference, reason = probability_verdict(probability_a)
            return Judgment(preference=preference, parts=parts, reason=reason, probability_a=probability_a)
        votes = Counter(p.preference for p in parts if p.preference is not None)
        ranked = votes.most_common()
        if not ranked:
            return Judgment(preference=None, parts=parts, reason="no member gave a verdict")
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            return Judgment(preference=None, parts=parts, reason="tied vote")
        known = [p.probability_a for p in parts if p.probability_a is not None]
        return Judgment(
            preference=ranked[0][0],
            parts=parts,
            probability_a=sum(known) / len(known) if len(known) == len(parts) else None,
        )


class Cascade(_Composite):
    """Ask the first judge; escalate to the next while the verdict is missing (inconsistent or unparsed)."""

    async def adecide(self, pair: Pair) -> Judgment:
        parts = []
        for judge in self.members:
            parts.append(await judge.ajudge(pair))
            if parts[-1].preference is not None:
                break
        last = parts[-1]
        notes = (f"escalated to member {len(parts) - 1}",) if len(parts) > 1 else ()
        return Judgment(
            preference=last.preference,
            reason=last.reason,
            parts=tuple(parts),
            probability_a=last.probability_a,
            notes=notes,
        )
