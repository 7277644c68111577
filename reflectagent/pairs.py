"""Preference pairs: the unit a judge works on, read from JSONL without losing a line.

The schema is the one of ``shared/data``: id, prompt, response_a, response_b, and optional
label ("A", "B" or "tie", any case), category and source. A bad line never stops a file: it is
reported with its line number and the rest are still read. A file that is not lines of text
at all (a folder, UTF-16, gzip, one JSON array) is read as what it is or refused as a whole.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from reflectagent.errors import ReflectAgentError

logger = logging.getLogger(__name__)

LABELS = ("A", "B", "tie")
TEXT_FIELDS = ("prompt", "response_a", "response_b")


class InvalidPair(ReflectAgentError, ValueError):
    """A pair that cannot be judged, with the reason."""


class PairFileError(ReflectAgentError, ValueError):
    """A whole file that cannot be read as pairs (missing, a folder), with what to do instead."""


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
        if not self.prompt.strip():
            raise InvalidPair("the prompt is empty: there is nothing to judge the responses against")
        if not self.response_a.strip() and not self.response_b.strip():
            raise InvalidPair("both responses are empty")
        if self.label is not None and self.label not in LABELS:
            raise InvalidPair(f"label must be one of {LABELS}, got {self.label!r}")

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


@dataclass(frozen=True)
class BadLine:
    path: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.error}"


def parse_pair(row: object) -> Pair:
    if not isinstance(row, dict):
        raise InvalidPair(f"expected a JSON object, got {type(row).__name__}")
    missing = [name for name in TEXT_FIELDS if row.get(name) is None]
    if missing:
        raise InvalidPair(f"missing field(s): {', '.join(missing)}")
    known = {"id", "label", "category", "source", *TEXT_FIELDS}
    values = {k: row[k] for k in known if k in row}
    if values.get("id") is not None:
        values["id"] = str(values["id"])
    if isinstance(values.get("label"), str):  # "a", " B ", "TIE": what the writer meant is not in doubt
        values["label"] = {"a": "A", "b": "B", "tie": "tie"}.get(values["label"].strip().lower(), values["label"])
    for name, value in values.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON allows "\ud800"; no text encoding does
                raise InvalidPair(f"{name} holds a lone surrogate escape ({value[exc.start]!r} at character "
                                  f"{exc.start + 1}), which is not text: fix or remove that \\u escape") from None
    return Pair(**values)


def duplicate_ids(ids: Iterable[str | None]) -> dict[str, int]:
    """Ids given to more than one pair (``pair.id`` of each), with their counts: each such pair is still judged."""
    counts: dict[str, int] = {}
    for key in ids:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    return {key: n for key, n in counts.items() if n > 1}


_UTF16_32 = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
             (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The file's lines as UTF-8 bytes, streamed from one open handle (a pipe works too): gzip is opened,
    UTF-16/32 (known by their byte order mark) re-encoded, and a UTF-8 byte order mark dropped; anything
    else is left for each line to decode."""
    if not path.exists():
        raise PairFileError(f"no such file: {path}")
    if path.is_dir():
        raise PairFileError(f"{path} is a folder: give a JSONL file of pairs (one JSON object per line)")
    with path.open("rb") as handle:
        start = handle.peek(4)[:4]
        if start.startswith(b"\x1f\x8b"):
            try:
                with gzip.GzipFile(fileobj=handle) as unpacked:
                    yield from _raw_lines_of(unpacked)
            except (EOFError, gzip.BadGzipFile) as exc:
                raise PairFileError(f"{path} is not a readable gzip file ({exc}): check or re-compress it") from exc
            return
        for bom, encoding in _UTF16_32:
            if start.startswith(bom):
                text = handle.read().decode(encoding, errors="replace")  # a bad code unit shows as U+FFFD
                # only "\n" ends a line: U+2028 and its kin may stand unescaped inside a JSON string
                yield from (line.encode("utf-8") for line in text.split("\n"))
                return
        yield from _raw_lines_of(handle)


def _raw_lines_of(handle) -> Iterator[bytes]:
    for number, raw in enumerate(handle, start=1):
        yield raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw


def _json_array(lines: list[bytes]) -> list | None:
    """The items, when the whole file is one JSON array (as ``json.dump(pairs)`` writes) rather than lines."""
    try:
        whole = json.loads(b"".join(lines).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return whole if isinstance(whole, list) else None


def iter_pairs(path: str | Path, bad_lines: list[BadLine] | None = None) -> Iterator[Pair]:
    """Yield the valid pairs of a JSONL file; append every bad line to ``bad_lines`` (or log it, if no
    list is given: then nobody else will say it). A missing file or a folder is a :class:`PairFileError`.

    Bytes that are not UTF-8 make that line bad (with the byte offset), not the file. A JSON array of
    pairs is read too, its items numbered like lines. Lines are streamed, except for a file that starts
    with ``[`` (it may be one array, which is read whole).
    """
    path = Path(path)
    lines = _raw_lines(path)
    first = next(lines, None)
    items = None
    if first is not None and first.lstrip().startswith(b"["):
        held = [first, *lines]
        items = _json_array(held)
        lines = iter(held)
    else:
        lines = itertools.chain([first] if first is not None else [], lines)
    numbered = enumerate(items, start=1) if items is not None else enumerate(lines, start=1)
    for number, raw in numbered:
        if items is not None:
            row, problem = raw, None
        elif not raw.strip():
            continue
        else:
            row, problem = _decode(path, number, raw)
        if problem is None:
            try:
                yield parse_pair(row)
                continue
            except InvalidPair as exc:
                problem = BadLine(str(path), number, str(exc))
        logger.log(logging.DEBUG if bad_lines is not None else logging.WARNING, "skipping %s", problem)
        if bad_lines is not None:
            bad_lines.append(problem)


def _decode(path: Path, number: int, raw: bytes) -> tuple[object, BadLine | None]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, BadLine(str(path), number, f"not UTF-8 (byte {exc.start + 1} of the line): save the file as UTF-8 "
                                                "(from Latin-1: iconv -f latin1 -t utf-8)")
    except json.JSONDecodeError as exc:
        return None, BadLine(str(path), number, f"not JSON: {exc.msg} at column {exc.colno}")


class PairFile:
    """The valid pairs of a file on disk, read again each time they are iterated rather than held, so a run
    of any length holds only the pairs in flight. Made by reading the file once: its bad lines are reported
    before any judging, its pairs counted (``len``) and their ids kept, so a file that changes while it is
    judged is an error instead of other pairs judged under the same run. A pipe can be read only once: use
    :func:`read_pairs` for one.
    """

    def __init__(self, path: str | Path, limit: int | None = None):
        self.path, self.bad_lines = Path(path), []
        # the whole file is read, so every bad line is reported; a pair's hash, so the whole pair (not only
        # its id) must read the same when judged
        ids, fingerprints = [], []
        for pair in iter_pairs(self.path, self.bad_lines):
            ids.append(pair.id)
            fingerprints.append(hash(pair))
        self.ids, self._fingerprints = ids[:limit], fingerprints[:limit]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Pair]:
        again = iter_pairs(self.path, [])  # its bad lines were reported by the first reading
        for number, expected in enumerate(self._fingerprints, start=1):
            pair = next(again, None)
            if pair is None or hash(pair) != expected:
                raise PairFileError(f"{self.path} changed while it was being judged (its pair {number} is not the one "
                                    "read at the start): judge a copy that nothing writes to, then run again "
                                    "(with the cache on, finished judgments are reused)")
            yield pair


def read_pairs(path: str | Path) -> tuple[list[Pair], list[BadLine]]:
    bad: list[BadLine] = []
    return list(iter_pairs(path, bad)), bad


def sample_path() -> Path:
    """The 32 real, labelled pairs shipped with reflectagent (origins in the README)."""
    return Path(__file__).parent / "data" / "sample_pairs.jsonl"


def sample_pairs(limit: int | None = None) -> list[Pair]:
    pairs, _ = read_pairs(sample_path())
    return pairs[:limit]
