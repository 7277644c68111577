"""Compute that follows doubt: a ladder of existing programs, climbed only while the verdict is in doubt.

Most pairs are easy: the verdict token alone, in both orders (``direct-prob``, 2 LM calls), settles
them. ``EscalatingJudge`` asks its first stage and climbs to the next only while the current stage's
verdict is in doubt: no verdict, its two presentation orders leaning different ways, or its P(A)
within ``threshold`` of 0.5 (calibrated, where the stage is a :class:`Calibrated` program). The
default ladder (:func:`ladder`) is the issue's: the verdict alone; then analyses (``genrm-prob``);
then more samples (two per order); then reflection on the analyses (``reflectrm-prob``); then, for
each backend named in ``next_backends`` (a served large model, say), the verdict alone there.

Every stage is an ordinary program with its own backend (as in :class:`~reflectagent.programs.Cascade`),
so nothing is re-implemented and every step goes through the judgment cache: a later stage that
needs an analysis an earlier stage wrote (GenRM's first sample is ReflectRM's stage 1) finds it there,
and it is charged once in the judgment's cost (with the cache off it is really made again, and charged).
A budget per judgment (``max_calls``, ``max_tokens``) caps the climb: a stage starts only if its new
calls fit what is left (tokens estimated at the judgment's tokens per call so far). The final verdict
is the last stage's that reached one; ``Judgment.decided_by`` names that stage, ``parts`` holds every
stage's judgment, the notes say why each step up was taken, and ``cost`` is what the climb spent.

Whether to climb depends only on a stage's own judgment and the threshold, so a run at a higher
threshold climbs at least as far: one run at threshold 1 (every stage, within the budget) holds the
runs at every lower threshold as prefixes. :meth:`EscalatingJudge.replay` reads them off, which is how
:func:`choose_threshold` picks the threshold on dev pairs without judging them again.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

from reflectagent.calling.cache import current_cache
from reflectagent.judging.base import Judge
from reflectagent.judging.runs import judge_pairs
from reflectagent.programs.compose import _Composite
from reflectagent.programs.genrm import GenRM, sample_plan
from reflectagent.programs.reflectrm import ReflectRM, probability_a_of, stage1_plan
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis, Judgment, Rating, Reflection, Usage

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1  # a starting point only: choose yours on dev pairs (choose_threshold, `reflectagent calibrate`)
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def ladder(next_backends: tuple[str, ...] | list[str] = ()) -> tuple[list, list[str]]:
    """The default stages and their names: direct-prob, analyses, more samples, reflection, then
    direct-prob on each of ``next_backends``."""
    members = [
        (GenRM(both_orders=True, decision="probability", rationale=False), None),
        (GenRM(both_orders=True, decision="probability"), None),
        (GenRM(samples=2, both_orders=True, decision="probability"), None),
        (ReflectRM(samples=2, decision="probability"), None),
        *((GenRM(both_orders=True, decision="probability", rationale=False), backend) for backend in next_backends),
    ]
    names = ["direct-prob", "analyses", "samples", "reflection", *(f"direct-prob@{b}" for b in next_backends)]
    return members, names


def _step_key(step: Analysis | Reflection | Rating) -> tuple:
    if isinstance(step, Reflection):
        return ("reflection", step.first, step.second, step.raw, step.text, step.probability_first)
    if isinstance(step, Rating):
        return ("rating", step.response, step.sample, step.raw, step.text, step.score)
    return ("analysis", step.swapped, step.sample, step.raw, step.text, step.probability)


def _keys(judgment: Judgment) -> set:
    return {_step_key(s) for s in judgment.analyses + judgment.ratings} | {
        k for part in judgment.parts for k in _keys(part)
    }


def charge_once(judgment: Judgment, earlier: list[Judgment]) -> Judgment:
    """``judgment`` with every analysis or rating an earlier stage *on the same backend* already holds made free
    (its usage zeroed, marked cached): it came from the cache, so the climb paid for it once."""
    seen = set().union(*(_keys(j) for j in earlier)) if earlier else set()
    if not seen:
        return judgment

    def free(steps):
        return tuple(replace(s, usage=Usage(), cached=True) if _step_key(s) in seen else s for s in steps)

    return replace(
        judgment,
        analyses=free(judgment.analyses),
        ratings=free(judgment.ratings),
        parts=tuple(charge_once(p, earlier) for p in judgment.parts),
    )


def orders_disagree(judgment: Judgment) -> bool:
    """Whether the analyses of the two presentation orders lean different ways (by their mean P(A), else by
    their votes). A judgment decided by reflection or by members is not read this way."""
    if judgment.reflections or judgment.parts:
        return False
    return bool(analyses_disagree(judgment))


def analyses_disagree(judgment: Judgment) -> bool | None:
    """Whether the analyses of the two presentation orders lean different ways (by their mean P(A), else by
    their votes), whatever decided the judgment; None where the parsed analyses do not cover both orders (what
    the reward service's order-flip gauge and mining the cache for doubts read)."""
    sides = []
    for swapped in (False, True):
        shown = [a for a in judgment.analyses if a.swapped == swapped and a.parsed]
        if not shown:
            return None
        probabilities = [probability_a_of(a) for a in shown]
        if all(p is not None for p in probabilities):
            mean = sum(probabilities) / len(probabilities)
            sides.append(None if mean == 0.5 else mean > 0.5)
        else:
            (top, count), *rest = Counter(a.preference for a in shown).most_common()
            sides.append(None if rest and rest[0][1] == count else top == "A")
    return None not in sides and sides[0] != sides[1]


def doubt(judgment: Judgment, threshold: float) -> str | None:
    """Why this stage's verdict is not final (None when it is)."""
    if judgment.preference is None:
        return f"no verdict ({judgment.reason})"
    if orders_disagree(judgment):
        return "the two orders disagree"
    if judgment.probability_a is not None and abs(judgment.probability_a - 0.5) < threshold:
        return f"margin {abs(judgment.probability_a - 0.5):.3f} under {threshold:g}"
    return None


def planned_steps(judge: Judge, backend) -> set | None:
    """The steps a stage makes on ``backend``, as (backend, signature, order, sample) for analyses (what it may
    share with earlier stages) and one entry per reflection. None for a program whose plan is not known here."""
    from reflectagent.programs.calibration import Calibrated

    if isinstance(judge, Calibrated):
        return planned_steps(judge.inner, backend)
    if isinstance(judge, GenRM):
        signature = judge.analyzer.predict.signature.__name__
        return {
            (backend, signature, swapped, sample)
            for swapped, sample in sample_plan(judge.options["samples"], judge.options["both_orders"])
        }
    if isinstance(judge, ReflectRM):
        k = judge.options["samples"]
        analyses = {
            (backend, judge.analyzer.predict.signature.__name__, swapped, sample) for swapped, sample in stage1_plan(k)
        }
        return analyses | {("reflection", id(judge), i) for i in range(k * (k - 1))}
    return None


def _backend_key(judge: Judge, spec: dict):
    """What tells two stages' backends apart: the configured name, else the LM object bound, else the one in context."""
    if spec.get("backend"):
        return spec["backend"]
    lms = {id(p.lm) for p in judge.predictors() if p.lm is not None}
    return min(lms) if lms else None


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold chosen on dev pairs, and each candidate's dev accuracy and LM calls per judgment."""

    threshold: float
    table: tuple[tuple[float, float, float], ...]  # (threshold, accuracy, calls per judgment)
    pairs: int


class EscalatingJudge(_Composite):
    """Stages tried in order while the verdict is in doubt (see the module docstring).

    ``members`` are ``(judge, backend)`` as in :class:`Cascade`, cheapest first; ``stages`` names them;
    ``threshold`` is the margin |P(A) - 0.5| below which a verdict is doubted; ``max_calls`` and
    ``max_tokens`` cap what one judgment may spend.
    """

    def __init__(
        self,
        members: list | None = None,
        stages: list[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        max_calls: int | None = None,
        max_tokens: int | None = None,
        chosen_on: dict | None = None,
    ):
        if members is None:
            members, default_names = ladder()
            stages = stages or default_names
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a margin of P(A) from 0.5, in [0, 1]; not {threshold}")
        for name, value in (("max_calls", max_calls), ("max_tokens", max_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        super().__init__(members, threshold=threshold, max_calls=max_calls, max_tokens=max_tokens)
        names = list(stages) if stages else [f"stage {k + 1}" for k in range(len(self.members))]
        if len(names) != len(self.members):
            raise ValueError(f"{len(names)} stage names for {len(self.members)} stages")
        self.options["stages"] = names
        if chosen_on is not None:  # where the threshold was chosen (tune_escalation): kept with the program
            self.options["chosen_on"] = chosen_on
        self.stages, self.threshold, self.max_calls, self.max_tokens = names, threshold, max_calls, max_tokens
        self._backends = [_backend_key(judge, spec) for judge, spec in zip(self.members, self.options["members"])]
        self._plans = [planned_steps(judge, key) for judge, key in zip(self.members, self._backends)]

    def with_threshold(self, threshold: float) -> EscalatingJudge:
        """The same stages (the same judge objects, bound to the same backends) at another threshold."""
        twin = EscalatingJudge.__new__(EscalatingJudge)
        twin.__dict__.update(self.__dict__)
        twin.options = {**self.options, "threshold": threshold}
        twin.threshold = threshold
        return twin

    def _new_calls(self, k: int, ran: int) -> int | None:
        """The LM calls stage ``k`` would add after the first ``ran`` stages (shared steps come from the cache)."""
        plan = self._plans[k]
        if plan is None:
            return None
        done = set().union(*(p for p in self._plans[:ran] if p is not None)) if ran else set()
        return len(plan - done) if current_cache().enabled else len(plan)

    def _fits(self, k: int, parts: list[Judgment]) -> str | None:
        """Why stage ``k`` would overrun the budget, or None when it fits."""
        spent = sum((p.cost for p in parts), Usage())
        calls = self._new_calls(k, len(parts))
        if self.max_calls is not None:
            if (
                calls is None
                and spent.lm_calls >= self.max_calls
                or calls is not None
                and spent.lm_calls + calls > self.max_calls
            ):
                return f"{calls if calls is not None else 'unknown'} more calls would overrun max_calls = {self.max_calls} ({spent.lm_calls} spent)"
        if self.max_tokens is not None:
            tokens = spent.prompt_tokens + spent.completion_tokens
            estimate = tokens / spent.lm_calls * (calls if calls is not None else 1) if spent.lm_calls else 0
            if tokens + estimate > self.max_tokens:
                return f"about {estimate:.0f} more tokens would overrun max_tokens = {self.max_tokens} ({tokens} spent)"
        return None

    def _next(self, parts: list[Judgment], threshold: float, notes: list[str]) -> int | None:
        """The stage to run after ``parts``, or None to stop (the reason appended to ``notes``)."""
        k = len(parts)
        if k == 0:
            return 0
        reason = doubt(parts[-1], threshold)
        if reason is None or k == len(self.members):
            return None
        notes.append(f"{self.stages[k - 1]}: {reason}")
        over = self._fits(k, parts)
        if over is not None:
            notes.append(f"budget: {self.stages[k]} not run, {over}")
            return None
        return k

    def _conclude(self, parts: list[Judgment], notes: list[str]) -> Judgment:
        decided = next((k for k in range(len(parts) - 1, -1, -1) if parts[k].preference is not None), None)
        last = parts[-1]
        spent = sum((p.cost for p in parts), Usage()).lm_calls
        if decided is None:
            notes.append(f"no stage reached a verdict; {spent} LM calls")
            return Judgment(
                preference=None,
                reason=last.reason,
                parts=tuple(parts),
                probability_a=last.probability_a,
                notes=tuple(notes),
                decided_by=None,
            )
        name = self.stages[decided]
        notes.append(f"decided by {name} (stage {decided + 1} of {len(self.members)}); {spent} LM calls")
        final = parts[decided]
        return Judgment(
            preference=final.preference,
            parts=tuple(parts),
            probability_a=final.probability_a,
            notes=tuple(notes),
            decided_by=name,
            chosen=None,
        )

    async def adecide(self, pair: Pair) -> Judgment:
        parts: list[Judgment] = []
        notes: list[str] = []
        shared = current_cache().enabled
        while (k := self._next(parts, self.threshold, notes)) is not None:
            judgment = await self.members[k].ajudge(pair)
            same_backend = [p for p, key in zip(parts, self._backends) if key == self._backends[k]]
            parts.append(charge_once(judgment, same_backend) if shared else judgment)
        return self._conclude(parts, notes)

    def replay(self, judgment: Judgment, threshold: float) -> Judgment:
        """The judgment this judge would have given at ``threshold``, read off ``judgment``, one of its own made at
        a threshold at least as high (with the same budget): no LM call."""
        parts: list[Judgment] = []
        notes: list[str] = []
        while (k := self._next(parts, threshold, notes)) is not None:
            if k >= len(judgment.parts):
                raise ValueError(
                    "the judgment stopped before this threshold would: was it made by another judge or budget?"
                )
            parts.append(judgment.parts[k])
        return replace(self._conclude(parts, notes), latency_s=judgment.latency_s, program=judgment.program)


def choose_threshold(
    judge: EscalatingJudge,
    pairs: list[Pair],
    thresholds: tuple[float, ...] = THRESHOLDS,
    *,
    max_calls_per_judgment: float | None = None,
    concurrency: int = 8,
    progress: bool = False,
) -> ThresholdChoice:
    """The threshold with the best accuracy on labelled dev ``pairs`` (each judged as given and swapped; no
    verdict is wrong), the cheaper on a tie; with ``max_calls_per_judgment``, only thresholds that spend at most
    that many LM calls per judgment on average count. The pairs are judged once, every stage within the budget
    (threshold 1); each threshold is then replayed from those judgments."""
    from reflectagent.programs.calibration import presentations

    shown, outcomes = presentations(pairs)
    if not shown:
        raise ValueError("choosing a threshold needs pairs labelled A or B")
    full = judge.with_threshold(1.0)
    judgments = judge_pairs(full, shown, concurrency=concurrency, progress=progress)
    table = []
    for threshold in sorted(set(thresholds)):
        replayed = [full.replay(j, threshold) for j in judgments]
        right = sum(j.preference == ("A" if y else "B") for j, y in zip(replayed, outcomes))
        calls = sum(j.cost.lm_calls for j in replayed) / len(replayed)
        table.append((threshold, right / len(replayed), calls))
    allowed = [row for row in table if max_calls_per_judgment is None or row[2] <= max_calls_per_judgment]
    if not allowed:
        raise ValueError(
            f"no threshold spends at most {max_calls_per_judgment} calls per judgment: the first stage "
            f"alone spends {table[0][2]:.2f}"
        )
    best = max(allowed, key=lambda row: (row[1], -row[2], -row[0]))
    logger.info(
        "threshold %.3g chosen on %d dev pairs: accuracy %.3f at %.2f calls per judgment",
        best[0],
        len(shown) // 2,
        best[1],
        best[2],
    )
    return ThresholdChoice(best[0], tuple(table), len(shown) // 2)


def tune_escalation(
    judge: EscalatingJudge,
    pairs: list[Pair],
    method: str = "temperature",
    *,
    split: str,
    data: list[str] | None = None,
    thresholds: tuple[float, ...] = THRESHOLDS,
    max_calls_per_judgment: float | None = None,
    concurrency: int = 8,
    progress: bool = False,
) -> EscalatingJudge:
    """Each stage calibrated on the dev ``pairs`` (:func:`~reflectagent.programs.calibration.calibrate`), then the
    threshold chosen on them for the calibrated margins; the choice and its table are kept in the options."""
    from reflectagent.programs.calibration import Calibrated, calibrate, provenance

    where = provenance(pairs, split, data)
    stages = []
    for member, spec in zip(judge.members, judge.options["members"]):
        inner = member.inner if isinstance(member, Calibrated) else member
        stages.append(
            (
                calibrate(inner, pairs, method, split=split, data=data, concurrency=concurrency, progress=progress),
                spec["backend"],
            )
        )
    # the inner judges keep the LMs their members were bound to; a named backend is bound again by name
    tuned = EscalatingJudge(stages, judge.stages, judge.threshold, judge.max_calls, judge.max_tokens)
    choice = choose_threshold(
        tuned,
        pairs,
        thresholds,
        max_calls_per_judgment=max_calls_per_judgment,
        concurrency=concurrency,
        progress=progress,
    )
    tuned = tuned.with_threshold(choice.threshold)
    tuned.options["chosen_on"] = {
        **where,
        "table": [list(row) for row in choice.table],
        "max_calls_per_judgment": max_calls_per_judgment,
    }
    return tuned
