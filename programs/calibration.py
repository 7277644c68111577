"""Calibrated P(A): a judge's verdict probability rescaled so that 0.8 means right 80% of the time.

A small judge's order-averaged verdict probability ranks pairs well enough but is rarely calibrated:
it may say 0.9 where it is right 60% of the time. A reward built on it (``reflectagent.rl``), or a
threshold on its margin (:mod:`reflectagent.programs.escalating`), reads the number itself, so the
number should mean what it says. Two standard maps of the logit of P(A) are fitted by maximum
likelihood on labelled *dev* pairs (never a test split), each judged as given and swapped:

- ``"temperature"`` (Guo et al., 2017): P' = sigmoid(logit(P) / T). One parameter; it never moves a
  verdict across 0.5, so accuracy is unchanged and only the confidence moves.
- ``"platt"`` (Platt, 1999): P' = sigmoid(a * logit(P) + b). The intercept can absorb a lean
  towards one position; with it a verdict near 0.5 may change sides.

Both fit Platt's smoothed targets ((N+ + 1) / (N+ + 2) for a positive, 1 / (N- + 2) for a negative),
so a small dev set that the judge gets all right does not fit a judge of infinite confidence. The
slope is kept positive (at least 0.001): calibration rescales a judge's confidence, it never
reverses the judge. :class:`Calibrated` wraps any program that decides by P(A) and saves the fitted
map, and where it was fitted, with the program (``save``/``load_program``): a calibrated program's
P(A) is what rewards and ``serve-rm`` return.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from reflectagent.judging.base import Judge
from reflectagent.judging.decisions import probability_verdict
from reflectagent.judging.runs import judge_pairs
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment

logger = logging.getLogger(__name__)

Method = Literal["temperature", "platt"]
METHODS = ("temperature", "platt")
EPSILON = 1e-6  # P(A) is clipped to [EPSILON, 1 - EPSILON] before its logit: a sure 0 or 1 stays finite
SLOPE_BOUNDS = (1e-3, 1e3)


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPSILON, 1 - EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(z, dtype=float)))  # stable at any z


def log_loss(probabilities, outcomes) -> float:
    """Mean negative log-likelihood of binary ``outcomes`` under ``probabilities`` (clipped like the fit)."""
    p = np.clip(np.asarray(probabilities, dtype=float), EPSILON, 1 - EPSILON)
    y = np.asarray(outcomes, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(p) else float("nan")


@dataclass(frozen=True)
class Calibration:
    """A fitted map of P(A), and what it was fitted on (``fitted_on``: split, data, pair count, ids' hash)."""

    method: Method
    slope: float  # a; for temperature scaling 1 / T
    intercept: float = 0.0  # b; 0 for temperature scaling
    fitted_on: dict[str, Any] = field(default_factory=dict)
    log_loss_before: float | None = None  # on the fitting judgments
    log_loss_after: float | None = None

    @property
    def temperature(self) -> float:
        return 1 / self.slope

    def apply(self, probability_a: float) -> float:
        return float(sigmoid(self.slope * logit(probability_a) + self.intercept))

    def describe(self) -> str:
        where = self.fitted_on.get("split", "?")
        if self.method == "temperature":
            return f"temperature T={self.temperature:.3g} (fitted on {where})"
        return f"Platt a={self.slope:.3g}, b={self.intercept:+.3g} (fitted on {where})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)


def fit_calibration(
    probabilities, outcomes, method: Method = "temperature", fitted_on: dict[str, Any] | None = None
) -> Calibration:
    """Fit ``method`` to P(A) values and outcomes (1: A was better) by Newton's method on the log-likelihood.

    The problem is convex in (slope, intercept); each Newton step is halved until the loss falls, so it
    converges from the identity map. With no data, or P(A) all 0.5, the identity map is returned."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    x, y = logit(probabilities), np.asarray(outcomes, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} probabilities against {len(y)} outcomes")
    positives = y.sum()  # Platt's targets: the labels pulled towards the prior, so a separable set stays finite
    targets = np.where(y > 0.5, (positives + 1) / (positives + 2), 1 / (len(y) - positives + 2))
    weights = np.array([1.0, 0.0])
    if len(x) and np.any(x != 0):
        weights = _newton(x, targets, method == "platt")
    fitted = Calibration(method, float(weights[0]), float(weights[1]), dict(fitted_on or {}))
    raw = np.asarray(probabilities, dtype=float)
    outcomes = np.asarray(outcomes, dtype=float)
    return replace(
        fitted,
        log_loss_before=log_loss(raw, outcomes) if len(raw) else None,
        log_loss_after=log_loss([fitted.apply(p) for p in raw], outcomes) if len(raw) else None,
    )


def _newton(x: np.ndarray, y: np.ndarray, intercept: bool, iterations: int = 100) -> np.ndarray:
    def loss(w):
        z = w[0] * x + w[1]
        return float(np.sum(np.logaddexp(0, z) - y * z))

    def clip(w):
        return np.array([np.clip(w[0], *SLOPE_BOUNDS), w[1] if intercept else 0.0])

    w = np.array([1.0, 0.0])
    for _ in range(iterations):
        p = sigmoid(w[0] * x + w[1])
        h = p * (1 - p)
        gradient = np.array([np.sum((p - y) * x), np.sum(p - y)])
        hessian = np.array([[np.sum(h * x * x), np.sum(h * x)], [np.sum(h * x), np.sum(h)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient) if intercept else np.array([gradient[0] / hessian[0, 0], 0.0])
        size, current = 1.0, loss(w)
        while size > 1e-10 and loss(clip(w - size * step)) > current:
            size /= 2
        updated = clip(w - size * step)
        if np.max(np.abs(updated - w)) < 1e-10:
            return updated
        w = updated
    return w


def decides_by_probability(judge: Judge) -> bool:
    """Whether a program's verdict is the side of 0.5 its P(A) is on (what calibration may rescale)."""
    from reflectagent.programs.escalating import EscalatingJudge  # it composes calibrated stages

    if isinstance(judge, (Calibrated, EscalatingJudge)):
        return True
    return judge.options.get("decision") == "probability"


class Calibrated(Judge):
    """A program whose P(A) is passed through a fitted :class:`Calibration`; the verdict follows the new P(A).

    ``judge`` (kept as ``inner``) is the program (or its saved spec: ``{"program": class name, "options": ...}``); its compiled
    state (demos, instructions) is saved with this one. A judgment without a P(A) comes back as it was.
    """

    def __init__(self, judge: Judge | dict, calibration: Calibration | dict):
        from reflectagent.programs import program_class

        if isinstance(judge, dict):
            judge = program_class(judge["program"])(**judge["options"])
        calibration = calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
        if not decides_by_probability(judge):
            raise ValueError(
                f"{type(judge).__name__} with {judge.options} does not decide by P(A): calibrate a "
                "program with decision='probability'"
            )
        super().__init__(
            judge={"program": type(judge).__name__, "options": judge.options}, calibration=calibration.to_dict()
        )
        self.inner = judge
        self.calibration = calibration

    async def adecide(self, pair: Pair) -> Judgment:
        return calibrated(await self.inner.ajudge(pair), self.calibration, type(self.inner).__name__)


def presentations(pairs: list[Pair]) -> tuple[list[Pair], list[bool]]:
    """Labelled pairs as given and swapped, and for each whether A is the better response."""
    labelled = [p for p in pairs if p.label in ("A", "B")]
    shown = [q for p in labelled for q in (p, p.swapped())]
    return shown, [q.label == "A" for q in shown]


def provenance(pairs: list[Pair], split: str, data: list[str] | None = None, **extra) -> dict[str, Any]:
    """Where a fit came from: the split's name, the files, how many pairs, and a hash of their ids and texts."""
    if split == "test":
        raise ValueError("never fit on a test split: give dev pairs (eval --split dev draws the same ones)")
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(
            "\x00".join([pair.id or "", *pair.inputs().values(), pair.label or ""]).encode("utf-8", "surrogatepass")
        )
    return {
        "split": split,
        "data": list(data or []),
        "pairs": len(pairs),
        "pairs_sha256": digest.hexdigest()[:16],
        **extra,
    }


def calibrate(
    judge: Judge,
    pairs: list[Pair],
    method: Method = "temperature",
    *,
    split: str,
    data: list[str] | None = None,
    concurrency: int = 8,
    progress: bool = False,
    **options,
) -> Judge:
    """``judge`` fitted on labelled ``pairs`` of a dev ``split`` (each judged as given and swapped, in the LM in
    context), as a :class:`Calibrated` program; an :class:`~reflectagent.programs.escalating.EscalatingJudge`
    gets each stage calibrated and its threshold chosen on the same pairs (``options`` go to that)."""
    from reflectagent.programs.escalating import EscalatingJudge, tune_escalation

    if isinstance(judge, EscalatingJudge):
        return tune_escalation(
            judge, pairs, method, split=split, data=data, concurrency=concurrency, progress=progress, **options
        )
    if isinstance(judge, Calibrated):
        judge = judge.inner  # refit from the raw P(A), not on top of an earlier map
    where = provenance(pairs, split, data)
    shown, outcomes = presentations(pairs)
    judgments = judge_pairs(judge, shown, concurrency=concurrency, progress=progress)
    kept = [(j.probability_a, y) for j, y in zip(judgments, outcomes) if j.probability_a is not None]
    if not kept:
        raise ValueError(f"none of the {len(shown)} judgments of the dev pairs gave a P(A): nothing to calibrate on")
    fitted = fit_calibration(
        [p for p, _ in kept],
        [y for _, y in kept],
        method,
        {**where, "judgments": len(shown), "with_probability": len(kept)},
    )
    logger.info(
        "calibrated %s: %s, log loss %.4f -> %.4f on %d judgments",
        type(judge).__name__,
        fitted.describe(),
        fitted.log_loss_before,
        fitted.log_loss_after,
        len(kept),
    )
    if math.isclose(fitted.slope, SLOPE_BOUNDS[0]):
        logger.warning("the fitted slope hit its lower bound: on these dev pairs P(A) carries no sign of the label")
    return Calibrated(judge, fitted)


def calibrated(judgment: Judgment, calibration: Calibration, decided_by: str) -> Judgment:
    """``judgment`` with its P(A) put through ``calibration`` and the verdict that P(A) gives (a judgment without
    a P(A) is returned as it is); ``decided_by`` names the inner program where the judgment does not."""
    if judgment.probability_a is None:
        return judgment
    probability_a = calibration.apply(judgment.probability_a)
    preference, reason = probability_verdict(probability_a)
    note = f"calibrated P(A) {probability_a:.4f} from {judgment.probability_a:.4f}: {calibration.describe()}"
    return replace(
        judgment,
        preference=preference,
        reason=reason,
        probability_a=probability_a,
        notes=judgment.notes + (note,),
        decided_by=judgment.decided_by or decided_by,
    )
