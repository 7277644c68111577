"""Rolling signals of a judge's health while it rewards a policy, as Prometheus gauges (``serve-rm``'s ``/metrics``).

Why: a policy trained on a judge finds the judge's weaknesses before anyone reads a log. Each gauge below is
computed over the last ``window`` observations, labelled with the judge's name, and says something when it moves:

=====================================  ==============================================================================
gauge (``reflectagent_judge_...``)     what a *rising* value means
=====================================  ==============================================================================
``length_correlation``                 scores follow response length (Pearson r of characters and the [0, 1] score):
                                       the judge rewards verbosity, and the policy will learn to pad
``length_slope``                       the same, as score per 1,000 characters
``order_flip_rate``                    of the judgments that saw both orders, the share whose two orders lean apart:
                                       verdicts follow position, not content (pairs past the judge's reach, or gamed)
``tie_rate``                           no verdict although the judge weighed both (P(A) with no side, tied ratings,
                                       a tie word): the completions look alike to it (a group collapsing)
``abstain_rate``                       no verdict and no P(A) (unparsed, split votes, cut or refused inputs): rewards
                                       with nothing behind them, trained at the neutral value or masked
``mean_margin``                        mean |P(A) - 0.5| (0.5 for a vote verdict, 0 for none): the judge is surer;
                                       a *falling* margin means completions it can no longer tell apart
=====================================  ==============================================================================

``window_judgments`` and ``window_scores`` say how many observations stand behind the rates; a gauge with
nothing to compute from (fewer than three scores, or no judgment that saw both orders) reads NaN.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from reflectagent.programs.escalating import analyses_disagree
from reflectagent.records.results import Judgment

WINDOW = 1000  # observations each rolling gauge is computed over
TIE_REASONS = ("tie", "tied", "identical responses")  # how programs say they weighed both responses as equal


@dataclass(frozen=True)
class Reading:
    """The monitored signals now (NaN where there is nothing to compute them from)."""

    length_correlation: float
    length_slope: float  # score per 1,000 characters
    order_flip_rate: float
    tie_rate: float
    abstain_rate: float
    mean_margin: float
    judgments: int  # in the window
    scores: int  # in the window


def order_flip(judgment: Judgment) -> bool | None:
    """Whether the two presentation orders of ``judgment`` lean apart (their analyses' P(A), else their votes,
    whatever decided it); None where the judgment did not see both orders."""
    return analyses_disagree(judgment)


def is_abstain(judgment: Judgment) -> bool:
    """No verdict and no P(A): nothing to reward from (what the service's routes flag)."""
    return judgment.preference is None and judgment.probability_a is None


def is_tie(judgment: Judgment) -> bool:
    """No verdict, although the judge weighed the two: a P(A) with no side, or the program's own tie."""
    return judgment.preference is None and (
        judgment.probability_a is not None or (judgment.reason or "").startswith(TIE_REASONS)
    )


def margin(judgment: Judgment) -> float:
    """How far the judgment is from a coin flip: |P(A) - 0.5|, else 0.5 for a vote verdict and 0 for none."""
    if judgment.probability_a is not None:
        return abs(judgment.probability_a - 0.5)
    return 0.5 if judgment.preference is not None else 0.0


def _rate(values: deque) -> float:
    return float(np.mean(values)) if values else math.nan


class Monitor:
    """The rolling signals of one judge, registered as gauges in ``registry`` (see the module)."""

    def __init__(self, judge: str, window: int = WINDOW, registry: CollectorRegistry | None = None):
        if window < 3:
            raise ValueError(f"window must be at least 3 observations, not {window}")
        self.judge = judge
        self._flips: deque[bool] = deque(maxlen=window)
        self._ties: deque[bool] = deque(maxlen=window)
        self._abstains: deque[bool] = deque(maxlen=window)
        self._margins: deque[float] = deque(maxlen=window)
        self._lengths: deque[int] = deque(maxlen=window)
        self._scores: deque[float] = deque(maxlen=window)
        self._gauges = {
            name: Gauge(f"reflectagent_judge_{name}", text, ["judge"], registry=registry).labels(judge)
            for name, text in (
                ("length_correlation", "Pearson r of response length and score, rolling"),
                ("length_slope", "score per 1,000 characters of response, rolling"),
                ("order_flip_rate", "share of judgments whose two orders lean apart, rolling"),
                ("tie_rate", "share of judgments with no verdict though the judge weighed both, rolling"),
                ("abstain_rate", "share of judgments with no verdict and no P(A), rolling"),
                ("mean_margin", "mean |P(A) - 0.5| of judgments, rolling"),
                ("window_judgments", "judgments behind the rolling rates"),
                ("window_scores", "scored responses behind the length gauges"),
            )
        }
        self._publish()

    def judged(self, judgments: Iterable[Judgment]) -> None:
        """Observe judgments (each comparison of a group, each pair against a reference, each pair judged)."""
        for judgment in judgments:
            flipped = order_flip(judgment)
            if flipped is not None:
                self._flips.append(flipped)
            self._ties.append(is_tie(judgment))
            self._abstains.append(is_abstain(judgment))
            self._margins.append(margin(judgment))
        self._publish()

    def scored(self, lengths: Sequence[int], scores: Sequence[float]) -> None:
        """Observe responses' lengths (characters) and their scores in [0, 1] (abstains left out by the caller)."""
        self._lengths.extend(lengths)
        self._scores.extend(scores)
        self._publish()

    def reading(self) -> Reading:
        correlation = slope = math.nan
        if len(self._scores) >= 3:
            x, y = np.asarray(self._lengths, float), np.asarray(self._scores, float)
            if x.std() > 0 and y.std() > 0:
                correlation = float(np.corrcoef(x, y)[0, 1])
            if x.std() > 0:
                slope = float(np.polyfit(x / 1000.0, y, 1)[0])
        return Reading(
            correlation,
            slope,
            _rate(self._flips),
            _rate(self._ties),
            _rate(self._abstains),
            _rate(self._margins),
            len(self._ties),
            len(self._scores),
        )

    def _publish(self) -> None:
        now = self.reading()
        for name, gauge in self._gauges.items():
            gauge.set(
                {"window_judgments": now.judgments, "window_scores": now.scores}.get(name, getattr(now, name, None))
            )
