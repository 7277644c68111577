"""Untrusted JSON Lines files read with bounds: every record, or the line number and reason it was skipped.

Why a module of its own: pairs, teacher judgments and benchmarks come from files a user was given, and a
file may be anything: a symlink to ``/dev/urandom`` (endless), a gzip bomb (13 MB that inflates to 3 GB),
a binary with no newline, a line nested 200,000 arrays deep or holding a 5,000-digit number. Every reader
here stops at a limit it names (:class:`ReadLimits`: the longest line, the most bytes after
decompression) instead of reading until memory runs out, refuses a device, and turns whatever Python's
JSON reader cannot take into a skipped line with its reason, so one bad line never stops a file.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict, Field

from reflectagent.errors import ReflectAgentError
from reflectagent.terminal import visible

MIB = 1 << 20
GIB = 1 << 30


class PairFileError(ReflectAgentError, ValueError):
    """A whole file that cannot be read (missing, a folder, a device, over a limit), with what to do instead."""


class ReadLimits(BaseModel):
    """How much one data file may hold (the ``[reading]`` table of the config). The defaults are far above real
    preference data (a 1,000,000-character response is a 1 MB line) and far below what exhausts a machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_line_bytes: int = Field(
        64 * MIB,
        gt=0,
        description=(
            "the longest line (or UTF-16 file, or JSON array on one line) read, in bytes; longer is an error, not a pair"
        ),
    )
    max_input_bytes: int = Field(
        4 * GIB, gt=0, description=("the most bytes read from one file, after decompression (a gzip bomb stops here)")
    )
    max_bad_lines: int = Field(
        10_000,
        gt=0,
        description=(
            "the most bad lines one file may have, each kept and reported; more and the file is refused (random bytes from "
            "a pipe are millions of bad lines)"
        ),
    )


DEFAULT_LIMITS = ReadLimits()


def size_text(n: int) -> str:
    """``n`` bytes as a person reads it in an error: '64 MiB', '4 GiB', else the bytes."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n:,} bytes"


@dataclass(frozen=True)
class BadLine:
    path: str
    line: int
    error: str

    def __str__(self) -> str:  # printed and logged: a path or a reason quoting data shows its control characters
        return visible(f"{self.path}:{self.line}: {self.error}")


class BadLines:
    """Where a reader reports the bad lines of one file: each goes to ``sink``, and one more than
    ``limits.max_bad_lines`` is a :class:`PairFileError`, so a stream of garbage (``cat /dev/urandom |``) costs a
    bounded list and a bounded read, not one entry per line until ``max_input_bytes``."""

    def __init__(self, path: Path, limits: ReadLimits, sink: Callable[[BadLine], None]):
        self.path, self.limits, self.sink, self.count = path, limits, sink, 0

    def __call__(self, problem: BadLine) -> None:
        self.count += 1
        if self.count > self.limits.max_bad_lines:
            raise PairFileError(
                f"{self.path}: more than {self.limits.max_bad_lines:,} bad lines (reading.max_bad_lines; "
                f"line {problem.line}: {problem.error}): this is not a JSONL file of pairs, or raise "
                "max_bad_lines in the [reading] table of the config"
            )
        self.sink(problem)


def check_readable(path: Path) -> None:
    """A :class:`PairFileError` unless ``path`` is a regular file or a pipe (a FIFO, ``<(...)``: read once, with the
    same bounds). A device (``/dev/urandom``, ``/dev/zero``, a terminal) or socket has no end to read to, even
    behind a symlink with a ``.jsonl`` name."""
    if not path.exists():
        raise PairFileError(f"no such file: {path}")
    if path.is_dir():
        raise PairFileError(f"{path} is a folder: give a JSONL file of pairs (one JSON object per line)")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        kind = (
            "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a file"
        )
        shown = f"{path} (-> {path.resolve()})" if path.is_symlink() else str(path)
        raise PairFileError(f"{shown} is {kind}, not a file of data: give a JSONL file (a pipe works too)")


_UTF16_32 = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class _Budget:
    """The bytes one file may still give, shared by every line of it."""

    def __init__(self, path: Path, limits: ReadLimits):
        self.path, self.limits, self.used = path, limits, 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limits.max_input_bytes:
            raise PairFileError(
                f"{self.path} holds more than {size_text(self.limits.max_input_bytes)} (after decompression): "
                "over reading.max_input_bytes. Is it the data file? If it is, raise max_input_bytes in the "
                "[reading] table of the config, or split the file"
            )

    def check_line(self, number: int, raw: bytes) -> bytes:
        limit = self.limits.max_line_bytes
        if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
            raise PairFileError(
                f"{self.path}:{number}: a line longer than {size_text(limit)} (reading.max_line_bytes): "
                "this is not a file of JSON lines, or it needs a larger max_line_bytes in the [reading] "
                "table of the config"
            )
        return raw


def raw_lines(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[bytes]:
    """The file's lines as UTF-8 bytes, streamed from one open handle (a pipe works too), each at most
    ``max_line_bytes`` and all together at most ``max_input_bytes`` (a :class:`PairFileError` names the limit):
    gzip is opened, UTF-16/32 (known by their byte order mark) re-encoded, a UTF-8 byte order mark dropped;
    anything else is left for each line to decode."""
    check_readable(path)
    budget = _Budget(path, limits)
    with path.open("rb") as handle:
        start = handle.peek(4)[:4]
        if start.startswith(b"\x1f\x8b"):
            try:
                with gzip.GzipFile(fileobj=handle) as unpacked:
                    yield from _bounded_lines(unpacked, budget)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:  # truncated, not gzip, a damaged stream
                raise PairFileError(
                    f"{path} is not a readable gzip file ({exc or type(exc).__name__}): it is damaged "
                    "or cut short; check it (gzip -t) or compress it again"
                ) from exc
            return
        for bom, encoding in _UTF16_32:
            if start.startswith(bom):
                data = handle.read(limits.max_line_bytes + 1)  # decoded whole: the line limit bounds it
                budget.take(len(data))
                if len(data) > limits.max_line_bytes:
                    raise PairFileError(
                        f"{path}: a {encoding.upper()} file longer than {size_text(limits.max_line_bytes)} "
                        "(reading.max_line_bytes, which bounds what is decoded at once): save it as "
                        "UTF-8 (iconv -f utf-16 -t utf-8), which is read line by line"
                    )
                text = data.decode(encoding, errors="replace")  # a bad code unit shows as U+FFFD
                # only "\n" ends a line: U+2028 and its kin may stand unescaped inside a JSON string
                yield from (line.encode("utf-8") for line in text.split("\n"))
                return
        yield from _bounded_lines(handle, budget)


def _bounded_lines(handle: BinaryIO, budget: _Budget) -> Iterator[bytes]:
    """Lines read with ``readline(limit + 1)``: a line with no end in sight costs the limit, not the file."""
    number = 0
    while raw := handle.readline(budget.limits.max_line_bytes + 1):
        number += 1
        budget.take(len(raw))
        budget.check_line(number, raw)
        yield raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw


class LineError(ReflectAgentError, ValueError):
    """One line that is not a JSON value (not UTF-8, not JSON, nested too deep, a number too long): its reason."""


def decode_line(raw: bytes) -> object:
    """One line's JSON value, or a :class:`LineError` saying why not, in the user's terms, for every way
    Python's JSON reader can fail (a ``RecursionError`` or the int-string limit included)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LineError(
            f"not UTF-8 (byte {exc.start + 1} of the line): save the file as UTF-8 "
            "(from Latin-1: iconv -f latin1 -t utf-8)"
        ) from None
    except json.JSONDecodeError as exc:
        raise LineError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise LineError("arrays or objects nested too deep to read (thousands of levels): not a pair") from None
    except ValueError:  # json's only other failure: an integer over Python's int-string limit
        raise LineError(
            f"a number of more than {sys.get_int_max_str_digits()} digits, which Python does not read: "
            "put it in quotes (an id is kept as text)"
        ) from None


def _json_array(lines: list[bytes]) -> list | None:
    """The items, when the whole file is one JSON array (as ``json.dump(pairs)`` writes) rather than lines."""
    try:
        whole = decode_line(b"".join(lines))
    except LineError:
        return None
    return whole if isinstance(whole, list) else None


def iter_records(
    path: str | Path, on_bad: Callable[[BadLine], None], limits: ReadLimits = DEFAULT_LIMITS
) -> Iterator[tuple[int, object]]:
    """``(line number, JSON value)`` of each non-blank line of a JSONL file; a line that is not a JSON value is
    given to ``on_bad`` instead. A file that is one JSON array gives its items, numbered like lines. Lines are
    streamed; a file that starts with ``[`` may be one array, read whole only if it ends within
    ``max_line_bytes`` (the most held at once): a longer one, or one that is not an array (a JSON Lines file whose
    first, bad, line starts with ``[``), is read line by line, its bad lines reported."""
    path = Path(path)
    lines = raw_lines(path, limits)
    first = next(lines, None)
    if first is None:
        return
    held_over = False  # the file began like an array but ran past max_line_bytes before its end
    if first.lstrip().startswith(b"["):
        held, size = [first], len(first)
        for raw in lines:
            held.append(raw)
            size += len(raw)
            if size > limits.max_line_bytes:
                held_over = True
                break
        else:
            items = _json_array(held)
            if items is not None:
                yield from enumerate(items, start=1)
                return
        lines = itertools.chain(held, lines)  # the held lines first, then the rest as it is read
        del held
    else:
        lines = itertools.chain([first], lines)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield number, decode_line(raw)
        except LineError as exc:
            reason = str(exc)
            if number == 1 and held_over:
                reason += (
                    f" (if the file is one JSON array, it is larger than {size_text(limits.max_line_bytes)}, "
                    "the most read at once (reading.max_line_bytes): write it as JSON Lines, one pair a line, "
                    "e.g. jq -c '.[]' pairs.json > pairs.jsonl)"
                )
            on_bad(BadLine(str(path), number, reason))
