"""Preference pairs: the unit a judge works on, read from JSONL without losing a line.

The schema is the one of ``shared/data``: id, prompt, response_a, response_b, and optional
label ("A", "B" or "tie", any case), category and source. A bad line never stops a file: it is
reported with its line number and the rest are still read. A file that is not lines of text
at all (a folder, a device, UTF-16, gzip, one JSON array) is read as what it is or refused as a
whole, within the bounds of :mod:`reflectagent.records.reading`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from reflectagent.errors import ReflectAgentError
from reflectagent.paths import PACKAGE_DATA
from reflectagent.records.reading import DEFAULT_LIMITS, BadLine, BadLines, PairFileError, ReadLimits, iter_records

logger = logging.getLogger(__name__)

LABELS = ("A", "B", "tie")
TEXT_FIELDS = ("prompt", "response_a", "response_b")
OPTIONAL_FIELDS = ("id", "label", "category", "source")
NAME_FIELDS = ("id", "category", "source")


class InvalidPair(ReflectAgentError, ValueError):
    """A pair that cannot be judged, with the reason."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    response_a: str
    response_b: str
    id: str | None = None
    label: str | None = None
    category: str | None = None
    source: str | None = None

    def __post_init__(self):
        for name in TEXT_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise InvalidPair(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in NAME_FIELDS:  # kept as dict keys and in sets (splits, duplicates, reports): text or nothing
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidPair(f"{name} must be text, got {type(value).__name__}")
        for name in (*TEXT_FIELDS, *OPTIONAL_FIELDS):
            _check_encodable(name, getattr(self, name))
        if not self.prompt.strip():
            raise InvalidPair("the prompt is empty: there is nothing to judge the responses against")
        if not self.response_a.strip() and not self.response_b.strip():
            raise InvalidPair("both responses are empty")
        if self.label is not None and self.label not in LABELS:
            raise InvalidPair(f"label must be one of {LABELS}, got {_shown(self.label)}")

    @property
    def identical(self) -> bool:
        return self.response_a.strip() == self.response_b.strip()

    def swapped(self) -> Pair:
        """The same pair with the responses in the other order (and the label with them)."""
        label = {"A": "B", "B": "A"}.get(self.label, self.label)
        return replace(self, response_a=self.response_b, response_b=self.response_a, label=label)

    def inputs(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in TEXT_FIELDS}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _shown(value: object, limit: int = 60) -> str:
    """A value quoted in an error: its repr (control characters escaped), cut to ``limit`` characters."""
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _check_encodable(name: str, value: str | None) -> None:
    """JSON allows ``"\\ud800"``; no text encoding does, so such a string would fail later, in a cache key or a request."""
    if not isinstance(value, str) or value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPair(
            f"{name} holds a lone surrogate escape ({value[exc.start]!r} at character "
            f"{exc.start + 1}), which is not text: fix or remove that \\u escape"
        ) from None


def _as_text(name: str, value: object) -> object:
    """An id, category or source given as a number kept as text (``7`` -> ``"7"``); anything else is left for
    :class:`Pair` to refuse by its type (a list or an object is not a name)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def parse_pair(row: object) -> Pair:
    """A pair from one JSON value, or an :class:`InvalidPair` with the reason (never another error: what a hostile
    line holds is reported, not raised)."""
    if not isinstance(row, dict):
        raise InvalidPair(f"expected a JSON object, got {type(row).__name__}")
    missing = [name for name in TEXT_FIELDS if row.get(name) is None]
    if missing:
        raise InvalidPair(f"missing field(s): {', '.join(missing)}")
    values = {k: row[k] for k in (*TEXT_FIELDS, *OPTIONAL_FIELDS) if row.get(k) is not None}
    for name in NAME_FIELDS:
        if name in values:
            values[name] = _as_text(name, values[name])
    if isinstance(values.get("label"), str):  # "a", " B ", "TIE": what the writer meant is not in doubt
        values["label"] = {"a": "A", "b": "B", "tie": "tie"}.get(values["label"].strip().lower(), values["label"])
    return Pair(**values)


def duplicate_ids(ids: Iterable[str | None]) -> dict[str, int]:
    """Ids given to more than one pair (``pair.id`` of each), with their counts: each such pair is still judged."""
    counts: dict[str, int] = {}
    for key in ids:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    return {key: n for key, n in counts.items() if n > 1}


def iter_pairs(
    path: str | Path, bad_lines: list[BadLine] | None = None, limits: ReadLimits = DEFAULT_LIMITS
) -> Iterator[Pair]:
    """Yield the valid pairs of a JSONL file; append every bad line to ``bad_lines`` (or log it, if no
    list is given: then nobody else will say it). A file that cannot be read at all (missing, a folder, a
    device, over ``limits``) is a :class:`PairFileError`.

    Bytes that are not UTF-8 make that line bad (with the byte offset), not the file; so does a line Python's
    JSON reader cannot take (nested too deep, a number too long) or a field of the wrong type; more than
    ``limits.max_bad_lines`` of them is an error for the file. A JSON array of pairs is read too, its items
    numbered like lines.
    """
    path = Path(path)

    def report(problem: BadLine) -> None:
        logger.log(logging.DEBUG if bad_lines is not None else logging.WARNING, "skipping %s", problem)
        if bad_lines is not None:
            bad_lines.append(problem)

    bad = BadLines(path, limits, report)
    for number, row in iter_records(path, bad, limits):
        try:
            yield parse_pair(row)
        except InvalidPair as exc:
            bad(BadLine(str(path), number, str(exc)))


class PairFile:
    """The valid pairs of a file on disk, read again each time they are iterated rather than held, so a run
    of any length holds only the pairs in flight. Made by reading the file once: its bad lines are reported
    before any judging, its pairs counted (``len``) and their ids kept, so a file that changes while it is
    judged is an error instead of other pairs judged under the same run. A pipe can be read only once: use
    :func:`read_pairs` for one.
    """

    def __init__(self, path: str | Path, limit: int | None = None, limits: ReadLimits = DEFAULT_LIMITS):
        self.path, self.bad_lines, self.limits = Path(path), [], limits
        # the whole file is read, so every bad line is reported; a pair's hash, so the whole pair (not only
        # its id) must read the same when judged
        ids, fingerprints = [], []
        for pair in iter_pairs(self.path, self.bad_lines, limits):
            ids.append(pair.id)
            fingerprints.append(hash(pair))
        self.ids, self._fingerprints = ids[:limit], fingerprints[:limit]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Pair]:
        again = iter_pairs(self.path, [], self.limits)  # its bad lines were reported by the first reading
        for number, expected in enumerate(self._fingerprints, start=1):
            pair = next(again, None)
            if pair is None or hash(pair) != expected:
                raise PairFileError(
                    f"{self.path} changed while it was being judged (its pair {number} is not the one "
                    "read at the start): judge a copy that nothing writes to, then run again "
                    "(with the cache on, finished judgments are reused)"
                )
            yield pair


def read_pairs(path: str | Path, limits: ReadLimits = DEFAULT_LIMITS) -> tuple[list[Pair], list[BadLine]]:
    """Every valid pair of a file (or pipe), held, and its bad lines."""
    bad: list[BadLine] = []
    return list(iter_pairs(path, bad, limits)), bad


def sample_path() -> Path:
    """The 32 real, labelled pairs shipped with reflectagent (origins in the README)."""
    return PACKAGE_DATA / "sample_pairs.jsonl"


def sample_pairs(limit: int | None = None) -> list[Pair]:
    pairs, _ = read_pairs(sample_path())
    return pairs[:limit]
