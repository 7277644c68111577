"""Judge metrics with confidence intervals, from per-pair records that can be recomputed.

Each pair is judged twice, as given and with A and B swapped; both verdicts are stored in
the pair's original A/B order. Conventions, stated once:

- accuracy: over pairs labelled A or B, a pair scores the mean of its two presentations
  (1 right, 0 wrong; no verdict is 0, or 0.5 with ``no_verdict="half"``, RewardBench's
  convention). Pairs labelled "tie" are counted apart and never scored. The interval is a
  seeded percentile bootstrap over pairs (the two presentations of a pair are not independent).
- consistency: the share of pairs with a verdict in both presentations and the same one;
  position bias: the share whose two verdicts name the same *position* (first or second);
  the rest had a missing verdict. Intervals are Wilson score intervals.
- parse failures: the share of LM steps whose output did not parse.
- cost: per judgment (one presentation), the calls and tokens it took to produce, cached or
  not. Time is not here: it is a fact of the run, not of the judgments (see the runner).
- paired difference: one run's pair scores minus a baseline run's on the same pairs, with a
  bootstrap over those pairs: whether one program beat another on these pairs.
- calibration: every judgment's P(A better), named in the pair's original order, against the label
  (pairs labelled A or B, both presentations; judgments without a P(A) are left out). Expected
  calibration error over 10 equal-width bins of P(A): the bins' |mean P(A) - share labelled A|,
  weighted by their size; the bins themselves are the reliability diagram.
A metric over no pairs is ``None``, never a division by zero.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Literal

from reflectagent.records.results import Judgment, Usage, flip


@dataclass(frozen=True)
class Record:
    """One pair, judged in both presentations by one program on one backend."""

    pair_id: str
    category: str
    source: str
    label: str | None
    verdicts: tuple[str | None, str | None]  # (as given, swapped), both in the original order
    reasons: tuple[str | None, str | None]
    steps: int
    unparsed_steps: int
    lm_calls: int  # cost over both presentations
    prompt_tokens: int
    completion_tokens: int
    probabilities: tuple[float | None, float | None] = (None, None)  # P(A) of each presentation, in the original order

    @classmethod
    def from_judgments(cls, pair, straight: Judgment, swapped: Judgment) -> Record:
        both = (straight, swapped)
        cost = straight.cost + swapped.cost
        return cls(
            pair_id=pair.id,
            category=pair.category or "",
            source=pair.source or "",
            label=pair.label,
            verdicts=(straight.preference, flip(swapped.preference)),
            reasons=(straight.reason, swapped.reason),
            steps=sum(len(j.steps) for j in both),
            unparsed_steps=sum(1 for j in both for s in j.steps if not s.parsed),
            lm_calls=cost.lm_calls,
            prompt_tokens=cost.prompt_tokens,
            completion_tokens=cost.completion_tokens,
            probabilities=(
                straight.probability_a,
                None if swapped.probability_a is None else 1 - swapped.probability_a,
            ),
        )

    @classmethod
    def from_dict(cls, row: dict) -> Record:
        return cls(
            **{
                **row,
                "verdicts": tuple(row["verdicts"]),
                "reasons": tuple(row["reasons"]),
                "probabilities": tuple(row.get("probabilities") or (None, None)),
            }
        )

    def to_dict(self) -> dict:
        return asdict(self)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (None for n = 0)."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(
    values: list[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (None for no values)."""
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return (means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1))])


@dataclass(frozen=True)
class Rate:
    """``count`` of ``n``, with its Wilson interval; ``value`` is None over nothing."""

    value: float | None
    count: int
    n: int
    ci: tuple[float, float] | None

    @classmethod
    def of(cls, count: int, n: int) -> Rate:
        return cls(value=count / n if n else None, count=count, n=n, ci=wilson(count, n))


@dataclass(frozen=True)
class Accuracy:
    value: float | None
    n: int  # pairs scored (labelled A or B)
    ci: tuple[float, float] | None  # bootstrap over pairs
    no_verdict_counts_as: float


@dataclass(frozen=True)
class PositionBias:
    first: Rate  # both presentations picked the first-shown response
    second: Rate


@dataclass(frozen=True)
class CostPerVerdict:
    lm_calls: float | None
    prompt_tokens: float | None
    completion_tokens: float | None

    @property
    def tokens(self) -> float | None:
        return None if self.prompt_tokens is None else self.prompt_tokens + (self.completion_tokens or 0)


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of P(A): its edges, how many judgments fell in it, their mean P(A) and the share labelled A."""

    low: float
    high: float
    count: int
    mean_probability: float | None
    frequency: float | None


@dataclass(frozen=True)
class Reliability:
    """Expected calibration error of P(A) and the bins of its reliability diagram."""

    ece: float | None
    n: int  # judgments with a P(A), of pairs labelled A or B
    bins: tuple[ReliabilityBin, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reliability:
        return cls(ece=data["ece"], n=data["n"], bins=tuple(ReliabilityBin(**b) for b in data["bins"]))


def reliability(probabilities: list[float], outcomes: list[bool], bins: int = 10) -> Reliability:
    """ECE over ``bins`` equal-width bins of [0, 1] (P = 1 falls in the last); empty bins weigh nothing."""
    import numpy as np

    p, y = np.asarray(probabilities, dtype=float), np.asarray(outcomes, dtype=float)
    index = np.minimum((p * bins).astype(int), bins - 1) if len(p) else np.array([], dtype=int)
    rows, error = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        mean = float(p[inside].mean()) if count else None
        frequency = float(y[inside].mean()) if count else None
        if count:
            error += count * abs(mean - frequency)
        rows.append(
            ReliabilityBin(low=b / bins, high=(b + 1) / bins, count=count, mean_probability=mean, frequency=frequency)
        )
    return Reliability(ece=error / len(p) if len(p) else None, n=len(p), bins=tuple(rows))


def calibration_of(records: list[Record]) -> Reliability:
    """:func:`reliability` of every P(A) the records hold, against their A/B labels."""
    kept = [(p, r.label == "A") for r in records if r.label in ("A", "B") for p in r.probabilities if p is not None]
    return reliability([p for p, _ in kept], [y for _, y in kept])


@dataclass(frozen=True)
class Summary:
    """Every metric of one group of pairs; ``to_dict``/``from_dict`` are its form in report.json."""

    pairs: int
    ties: int
    unlabelled: int
    accuracy: Accuracy
    consistency: Rate
    position_bias: PositionBias
    no_verdict: Rate
    parse_failures: Rate
    cost_per_verdict: CostPerVerdict
    calibration: Reliability | None = None  # None in reports written before it was measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        def rate(row):
            return Rate(**{**row, "ci": tuple(row["ci"]) if row.get("ci") else None})

        accuracy = data["accuracy"]
        return cls(
            pairs=data["pairs"],
            ties=data["ties"],
            unlabelled=data["unlabelled"],
            accuracy=Accuracy(**{**accuracy, "ci": tuple(accuracy["ci"]) if accuracy.get("ci") else None}),
            consistency=rate(data["consistency"]),
            position_bias=PositionBias(
                first=rate(data["position_bias"]["first"]), second=rate(data["position_bias"]["second"])
            ),
            no_verdict=rate(data["no_verdict"]),
            parse_failures=rate(data["parse_failures"]),
            cost_per_verdict=CostPerVerdict(**data["cost_per_verdict"]),
            calibration=Reliability.from_dict(data["calibration"]) if data.get("calibration") else None,
        )


def pair_score(record: Record, no_verdict: Literal["wrong", "half"] = "wrong") -> float | None:
    if record.label not in ("A", "B"):
        return None
    missing = 0.5 if no_verdict == "half" else 0.0
    scores = [missing if v is None else float(v == record.label) for v in record.verdicts]
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class Difference:
    """One run's accuracy minus a baseline's over the pairs both scored, with a paired bootstrap interval.

    Both runs judged the same pairs; where they agree on which pairs are easy, the interval of the per-pair
    differences is narrower than two runs' own intervals side by side, and it is the one that says whether
    a program beat another on these pairs."""

    value: float | None
    n: int  # pairs scored by both runs
    ci: tuple[float, float] | None


def paired_difference(
    records: list[Record], baseline: list[Record], no_verdict: Literal["wrong", "half"] = "wrong"
) -> Difference:
    """``records``' accuracy minus ``baseline``'s, pair by pair, with a seeded percentile bootstrap over those pairs.

    Pairs are matched by id and, for an id given more than once (two files named alike, pairs without ids),
    by its occurrence: the k-th record of an id against the baseline's k-th, as runs over the same pairs
    list them. Ties and pairs only one run judged are left out."""
    base = {key: pair_score(r, no_verdict) for key, r in _by_occurrence(baseline)}
    deltas = [
        score - base[key]
        for key, r in _by_occurrence(records)
        if (score := pair_score(r, no_verdict)) is not None and base.get(key) is not None
    ]
    return Difference(value=sum(deltas) / len(deltas) if deltas else None, n=len(deltas), ci=bootstrap(deltas))


def _by_occurrence(records: list[Record]) -> list[tuple[tuple[str | None, int], Record]]:
    seen: Counter = Counter()
    keyed = []
    for r in records:
        keyed.append(((r.pair_id, seen[r.pair_id]), r))
        seen[r.pair_id] += 1
    return keyed


def summarize(records: list[Record], no_verdict: Literal["wrong", "half"] = "wrong") -> Summary:
    """Every metric for one group of records (see the module docstring for the conventions)."""
    scored = [s for s in (pair_score(r, no_verdict) for r in records) if s is not None]
    n = len(records)
    judgments = 2 * n
    consistent = sum(1 for r in records if r.verdicts[0] is not None and r.verdicts[0] == r.verdicts[1])
    first = sum(1 for r in records if r.verdicts == ("A", "B"))
    second = sum(1 for r in records if r.verdicts == ("B", "A"))
    no_verdicts = sum(v is None for r in records for v in r.verdicts)
    steps = sum(r.steps for r in records)

    def per_verdict(total: int) -> float | None:
        return total / judgments if n else None

    return Summary(
        pairs=n,
        ties=sum(1 for r in records if r.label == "tie"),
        unlabelled=sum(1 for r in records if r.label is None),
        accuracy=Accuracy(
            value=sum(scored) / len(scored) if scored else None,
            n=len(scored),
            ci=bootstrap(scored),
            no_verdict_counts_as=0.5 if no_verdict == "half" else 0.0,
        ),
        consistency=Rate.of(consistent, n),
        position_bias=PositionBias(first=Rate.of(first, n), second=Rate.of(second, n)),
        no_verdict=Rate.of(no_verdicts, judgments),
        parse_failures=Rate.of(sum(r.unparsed_steps for r in records), steps),
        cost_per_verdict=CostPerVerdict(
            lm_calls=per_verdict(sum(r.lm_calls for r in records)),
            prompt_tokens=per_verdict(sum(r.prompt_tokens for r in records)),
            completion_tokens=per_verdict(sum(r.completion_tokens for r in records)),
        ),
        calibration=calibration_of(records),
    )


def summarize_by_category(
    records: list[Record], categories: list[str] | None = None, no_verdict: Literal["wrong", "half"] = "wrong"
) -> dict[str, Summary]:
    """``summarize`` per category; categories asked for but absent get the empty summary."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.category].append(record)
    names = sorted(set(groups) | set(categories or ()))
    return {name: summarize(groups.get(name, []), no_verdict) for name in names}


@dataclass(frozen=True)
class JudgingSummary:
    """What a batch of judgments (``reflectagent judge``) came to, against labels where pairs have them."""

    judged: int
    no_verdict: dict[str, int]  # reason -> judgments without a verdict for that reason
    labelled: int  # pairs labelled A or B
    correct: int  # of those, judged right (no verdict counts as wrong)
    steps: int
    unparsed_steps: int
    lm_calls: int  # made now (cached steps cost nothing)
    cached_steps: int
    cached_judgments: int  # judgments whose every step came from the cache
    prompt_tokens: int
    completion_tokens: int

    @property
    def verdicts(self) -> int:
        return self.judged - sum(self.no_verdict.values())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


class JudgingTally:
    """A :class:`JudgingSummary` counted as judgments arrive, holding none of them: a run of any size
    summarised in constant memory."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.no_verdict: Counter = Counter()
        self.usage = Usage()

    def add(self, pair, judgment: Judgment) -> None:
        c = self.counts
        c["judged"] += 1
        if judgment.preference is None:
            self.no_verdict[judgment.reason or ""] += 1
        if pair.label in ("A", "B"):
            c["labelled"] += 1
            c["correct"] += judgment.preference == pair.label
        c["steps"] += len(judgment.steps)
        c["unparsed_steps"] += sum(not s.parsed for s in judgment.steps)
        c["cached_steps"] += judgment.cache_hits
        c["cached_judgments"] += bool(judgment.steps) and judgment.cache_hits == len(judgment.steps)
        self.usage += judgment.usage

    def summary(self) -> JudgingSummary:
        c = self.counts
        return JudgingSummary(
            judged=c["judged"],
            no_verdict=dict(self.no_verdict.most_common()),
            labelled=c["labelled"],
            correct=c["correct"],
            steps=c["steps"],
            unparsed_steps=c["unparsed_steps"],
            lm_calls=self.usage.lm_calls,
            cached_steps=c["cached_steps"],
            cached_judgments=c["cached_judgments"],
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
        )


def summarize_judgments(pairs: list, judgments: list[Judgment]) -> JudgingSummary:
    tally = JudgingTally()
    for pair, judgment in zip(pairs, judgments, strict=True):
        tally.add(pair, judgment)
    return tally.summary()
