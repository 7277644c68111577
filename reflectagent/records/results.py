"""Typed, immutable results of judging.

Every preference here is in the caller's original A/B order, whatever order the model saw:
an ``Analysis`` made on the swapped pair has already been mapped back. Costs are derived
from the steps, never stored twice, so a cached step counts as a cache hit and costs this
run nothing, while its original cost stays available for accounting.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Preference = Literal["A", "B"]


def flip(preference: str | None) -> str | None:
    """The same verdict named from the other order of the pair."""
    return {"A": "B", "B": "A"}.get(preference) if preference else None


_NAMES = re.compile(r"\b([Rr]esponse|RESPONSE|[Aa]ssistant|[Oo]utput)(?:( )([AB])|(_)([ab]))\b")
_OTHER = {"A": "B", "B": "A", "a": "b", "b": "a"}


def swap_names(text: str) -> str:
    """The same analysis for the pair shown the other way round: the responses' names exchanged ("Response A" <->
    "Response B", and "response_a", "Assistant B", "Output A" likewise; "response a" is left, being English)."""
    return _NAMES.sub(lambda m: m[1] + (m[2] or m[4]) + _OTHER[m[3] or m[5]], text)


@dataclass(frozen=True)
class Usage:
    """What one LM call (or a sum of them) cost when it was made."""

    lm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.lm_calls + other.lm_calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.latency_s + other.latency_s,
        )


@dataclass(frozen=True)
class StepOutput:
    """One predictor call: parsed fields or the reason they could not be parsed."""

    fields: dict[str, Any] | None
    raw: str
    usage: Usage
    cached: bool = False
    error: str | None = None
    logprobs: dict[str, dict[str, float]] | None = None  # per Literal field: {choice: probability}
    truncated: tuple[str, ...] = ()  # input fields cut to fit the backend's context

    @property
    def parsed(self) -> bool:
        return self.fields is not None


@dataclass(frozen=True)
class Analysis:
    """One analysis of the pair and its verdict, mapped back to the original order."""

    text: str
    preference: Preference | None
    swapped: bool  # True when the model was shown (response_b, response_a)
    parsed: bool
    raw: str
    sample: int = 0
    probability: float | None = None  # P(preference) from the verdict token, when logprobs exist
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False
    truncated: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reflection:
    """A comparison of two analyses (indices into ``Judgment.analyses``)."""

    text: str
    first: int  # the analysis shown as analysis_1
    second: int  # the analysis shown as analysis_2
    more_reliable: int | None  # the index of the analysis judged more reliable; None if unparsed
    parsed: bool
    raw: str
    probability_first: float | None = (
        None  # P(analysis_1 is the more reliable) from the choice token, when logprobs exist
    )
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False
    truncated: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rating:
    """One response rated on its own (pointwise), named by its place in the original pair."""

    response: Preference  # which response of the pair was rated
    rating: int | None  # the generated rating; None if unparsed
    parsed: bool
    raw: str
    score: float | None = None  # the expected rating under the rating token's probabilities, when logprobs exist
    text: str = ""
    sample: int = 0
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False
    truncated: tuple[str, ...] = ()


@dataclass(frozen=True)
class Judgment:
    """A final preference with everything behind it.

    ``preference`` is None when no verdict could be reached; ``reason`` then says why
    (``"unparsed"``, ``"inconsistent"``, ...). It is never silently defaulted to "A".
    """

    preference: Preference | None
    analyses: tuple[Analysis, ...] = ()
    reflections: tuple[Reflection, ...] = ()
    reason: str | None = None
    latency_s: float = 0.0  # wall time of this call, steps run concurrently
    notes: tuple[str, ...] = ()  # e.g. which inputs were truncated to fit the context
    probability_a: float | None = None  # P(response A is better), order-averaged, when known
    program: str = ""
    parts: tuple[Judgment, ...] = ()  # the judgments of member judges (ensembles, cascades)
    chosen: int | None = None  # the analysis whose verdict is final, where a program picks one
    ratings: tuple[Rating, ...] = ()  # pointwise programs: each response rated on its own
    decided_by: str | None = None  # the stage or member whose judgment is final, where a program escalates

    @property
    def steps(self) -> tuple[Analysis | Reflection | Rating, ...]:
        """Every LM step behind this judgment, members' included."""
        return self.analyses + self.reflections + self.ratings + tuple(s for part in self.parts for s in part.steps)

    @property
    def parsed(self) -> bool:
        return self.preference is not None

    @property
    def cache_hits(self) -> int:
        return sum(step.cached for step in self.steps)

    @property
    def usage(self) -> Usage:
        """What this call spent: cached steps cost nothing."""
        return sum((s.usage for s in self.steps if not s.cached), Usage())

    @property
    def cost(self) -> Usage:
        """What the judgment cost to produce, cached or not: the number to compare judges by."""
        return sum((s.usage for s in self.steps), Usage())

    @property
    def lm_calls(self) -> int:
        return self.usage.lm_calls

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Judgment:
        def build(kind, row):
            row = dict(row)
            row["usage"] = Usage(**row.get("usage", {}))
            row["truncated"] = tuple(row.get("truncated", ()))
            return kind(**{f.name: row[f.name] for f in fields(kind) if f.name in row})

        data = dict(data)
        data["analyses"] = tuple(build(Analysis, a) for a in data.get("analyses", ()))
        data["reflections"] = tuple(build(Reflection, r) for r in data.get("reflections", ()))
        data["ratings"] = tuple(build(Rating, r) for r in data.get("ratings", ()))
        data["notes"] = tuple(data.get("notes", ()))
        data["parts"] = tuple(cls.from_dict(part) for part in data.get("parts", ()))
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
