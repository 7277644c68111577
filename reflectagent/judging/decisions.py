"""How a program turns its analyses into a verdict: by vote, or by the order-averaged probability of A, never a
guess where neither says."""

from __future__ import annotations

from typing import Literal

Decision = Literal["vote", "probability"]


def check_decision(decision: str) -> None:
    if decision not in ("vote", "probability"):
        raise ValueError(f"decision must be 'vote' or 'probability', not {decision!r}")


def probability_verdict(probability_a: float | None) -> tuple[str | None, str | None]:
    """A if P(A) > 0.5, B if below; no verdict at exactly 0.5 or without probabilities (never a guess)."""
    if probability_a is None:
        return None, "no verdict probabilities"
    if probability_a == 0.5:
        return None, "tied probability"
    return ("A" if probability_a > 0.5 else "B"), None


def order_averaged_probability(analyses) -> float | None:
    """P(A better) averaged over the analyses (and so over both orders); None if any lacks it."""
    probs = [
        a.probability if a.preference == "A" else 1 - a.probability
        for a in analyses
        if a.parsed and a.probability is not None
    ]
    return sum(probs) / len(probs) if probs and len(probs) == len(analyses) else None
