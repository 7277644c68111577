"""The judging API in one import (and ``reflectagent.judge``'s names, as they were): the base every program extends
(:mod:`~reflectagent.judging.base`), how analyses become a verdict (:mod:`~reflectagent.judging.decisions`), the
smallest honest judge (:mod:`~reflectagent.judging.position_swap`) and the batch runner
(:mod:`~reflectagent.judging.runs`). Each is defined in its own module; the library imports them from there."""

from __future__ import annotations

from reflectagent.judging.base import Judge, ProgramFileError
from reflectagent.judging.decisions import (
    Decision,
    LogprobsUnavailable,
    check_decision,
    order_averaged_probability,
    probability_verdict,
)
from reflectagent.judging.position_swap import PositionSwapJudge
from reflectagent.judging.runs import RunInterrupted, ajudge_pairs, is_transient, judge_all, judge_in_order, judge_pairs

__all__ = [
    "Decision",
    "Judge",
    "LogprobsUnavailable",
    "PositionSwapJudge",
    "ProgramFileError",
    "RunInterrupted",
    "ajudge_pairs",
    "check_decision",
    "is_transient",
    "judge_all",
    "judge_in_order",
    "judge_pairs",
    "order_averaged_probability",
    "probability_verdict",
]
