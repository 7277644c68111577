"""Bad input, one row each: what a user gives, what happens, and what becomes of the data, checked through the
real command (and the reward service's routes). ``docs/bad-input.md`` is this table; a test keeps the two the
same (``python tests/test_bad_input.py > docs/bad-input.md`` writes it).

Nothing here may guess or lose: a bad line is skipped with its number and reason and the rest is judged, a
file or config that cannot be used is an error that says what to fix, no input error ever says "run again to
resume" (a re-run would fail the same way), and every row is run with ``-o``: the input must read the same
afterwards, a failed run must leave the previous output as it was, a finished one must hold every judgment.
No row may print a traceback, a raw control character, or the secret planted in some of them."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fakes import Engine
from typer.testing import CliRunner

from reflectagent.cli import app
from reflectagent.judge import Judge

ROOT = Path(__file__).resolve().parents[1]

RESUME = "run the same command again to resume"
SECRET = "sk-planted-b4d-1nput-7e2"  # written into some configs; must appear in no output and no file but the config
GOOD = {"prompt": "What is the capital of France?", "response_a": "Paris.", "response_b": "Berlin.", "label": "A"}


def row(**changes) -> dict:
    return {**GOOD, **changes}


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@dataclass
class Case:
    id: str
    group: str
    given: str
    behaviour: str
    data: bytes | Callable[[], bytes] | None = None  # the pairs file's bytes (None: no file is made)
    args: list[str] = field(default_factory=list)  # extra arguments; {dir} is the test's folder
    config: str | None = None  # TOML for the fake backend's config (None: the working one)
    code: int = 0
    shown: tuple[str, ...] = ()  # what the output must say
    judged: int | None = None  # pairs judged, when it runs
    file_name: str = "pairs.jsonl"
    fate: str | None = None  # what becomes of the data, when the default (by code and judged) does not say it
    hidden: tuple[str, ...] = ()  # what the output must not say
    links: dict[str, str] = field(default_factory=dict)  # symlinks made in {dir}: name -> target
    fifo: bool = False  # the pairs file is a named pipe, written while the command reads it
    backend: str = "shared"  # "shared": the module's fake engine; "own": one with ``engine``'s flags; "dead": nobody
    engine: tuple[str, ...] = ()
    previous: bytes | None = None  # what -o holds before the run
    partial: int | None = None  # judgments a failed run leaves in OUTPUT.partial (None: no such file)
    resume: bool = False  # the backend went away: the message may say a re-run resumes
    lock_held: bool = False  # another process holds -o's lock
    config_name: str = "c.toml"
    logged: tuple[str, ...] = ()  # what the log must say, once each (a warning)

    @property
    def what_becomes_of_the_data(self) -> str:
        if self.fate:
            return self.fate
        if self.code:
            return "none judged; nothing written" + ("; the earlier `-o` kept" if self.previous is not None else "")
        return f"{self.judged} judged, all written to `-o`"


MIB = 1 << 20


def gzip_bomb() -> bytes:
    """65 MiB of NUL bytes in 65 KB: one endless line once inflated (made when the row runs, not at import)."""
    return gzip.compress(b"\0" * (65 * MIB), compresslevel=1)


def damaged_gzip() -> bytes:
    """A gzip whose deflate stream has 20 bytes flipped: zlib's own error, not an OSError."""
    packed = bytearray(gzip.compress(lines(*(row(id=str(i)) for i in range(50))), mtime=0))
    packed[40:60] = bytes(b ^ 0xFF for b in packed[40:60])
    return bytes(packed)


def cut_gzip() -> bytes:
    """A gzip cut in half, as a download that stopped."""
    packed = gzip.compress(lines(*(row(id=str(i)) for i in range(50))), mtime=0)
    return packed[: len(packed) // 2]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


FILES = [
    Case(
        "utf8-bom",
        "file",
        "a UTF-8 file saved with a byte order mark",
        "read as UTF-8; the mark is not part of line 1",
        codecs.BOM_UTF8 + lines(GOOD),
        judged=1,
    ),
    Case(
        "crlf",
        "file",
        "Windows line endings (CRLF)",
        "read as usual",
        lines(GOOD).replace(b"\n", b"\r\n") * 2,
        judged=2,
    ),
    Case(
        "latin-1",
        "file",
        "a line in Latin-1 (or another 8-bit encoding)",
        "that line is skipped with its byte offset and how to convert the file; the rest is judged",
        lines(GOOD) + json.dumps(row(prompt="Où est Paris ?"), ensure_ascii=False).encode("latin-1") + b"\n",
        shown=("pairs.jsonl:2: not UTF-8 (byte 14 of the line): save the file as UTF-8", "iconv -f latin1"),
        judged=1,
    ),
    Case(
        "utf-16",
        "file",
        "a UTF-16 file (with its byte order mark, as Windows tools write it)",
        "decoded and read",
        lines(GOOD).decode().encode("utf-16"),
        judged=1,
    ),
    Case(
        "gzip",
        "file",
        "a gzip-compressed file (`pairs.jsonl.gz`)",
        "decompressed and read",
        gzip.compress(lines(GOOD, GOOD)),
        judged=2,
        file_name="pairs.jsonl.gz",
    ),
    Case(
        "gzip-damaged",
        "file",
        "a `.gz` whose compressed data is damaged (bytes flipped mid-stream)",
        "error: not a readable gzip file, naming it and zlib's reason; read no further",
        damaged_gzip,
        code=2,
        file_name="pairs.jsonl.gz",
        shown=("pairs.jsonl.gz is not a readable gzip file (Error -3 while decompressing",),
    ),
    Case(
        "gzip-cut",
        "file",
        "a `.gz` cut short (a download that stopped)",
        "error: not a readable gzip file (it ended early); read no further",
        cut_gzip,
        code=2,
        file_name="pairs.jsonl.gz",
        shown=("pairs.jsonl.gz is not a readable gzip file (Compressed file ended before the end-of-stream marker",),
    ),
    Case(
        "json-array",
        "file",
        "one JSON array of pairs instead of JSON Lines",
        "read; its items are numbered like lines",
        json.dumps([GOOD, row(id="x")], indent=2).encode(),
        judged=2,
        file_name="pairs.json",
    ),
    Case(
        "json-array-large",
        "file",
        "a JSON array longer than `[reading] max_line_bytes` (64 MiB; here 1,000 bytes)",
        "never held whole: read line by line, each line skipped; line 1's reason says to write JSON Lines (`jq -c`)",
        json.dumps([row(id=str(i)) for i in range(20)], indent=2).encode(),
        code=2,
        file_name="pairs.json",
        config="{working}[reading]\nmax_line_bytes = 1000\n",
        shown=("pairs.json:1: not JSON", "larger than 1,000 bytes, the most read at once", "jq -c '.[]'"),
    ),
    Case(
        "empty",
        "file",
        "an empty file",
        "error: the file holds no pairs",
        b"",
        code=2,
        shown=("holds no pairs (it is empty or blank)",),
    ),
    Case(
        "blank",
        "file",
        "only blank lines",
        "error: the file holds no pairs",
        b"\n  \n\t\n",
        code=2,
        shown=("holds no pairs",),
    ),
    Case(
        "folder",
        "file",
        "a folder instead of a file",
        "error: it is a folder; give a JSONL file",
        None,
        args=["{dir}"],
        code=2,
        shown=("is a folder: give a JSONL file",),
    ),
    Case(
        "missing",
        "file",
        "a path that does not exist",
        "error: no such file",
        None,
        args=["{dir}/nope.jsonl"],
        code=2,
        shown=("no such file",),
    ),
    Case(
        "all-bad",
        "file",
        "a file whose every line is bad",
        "each line is listed, then an error: every line was skipped",
        b"{not json\n[1]\n",
        code=2,
        shown=("pairs.jsonl:1: not JSON", "every line was skipped (2, above)"),
    ),
    Case(
        "device",
        "file",
        "a path that is a symlink to a device (`/dev/urandom`)",
        "error: it is a device, not a file of data",
        None,
        args=["{dir}/pairs.jsonl"],
        links={"pairs.jsonl": "/dev/urandom"},
        code=2,
        shown=("-> /dev/urandom) is a device, not a file of data",),
    ),
    Case(
        "fifo",
        "file",
        "a named pipe (or `<(...)`)",
        "read once, as it is written, within the same bounds as a file",
        lines(GOOD, GOOD),
        fifo=True,
        judged=2,
    ),
    Case(
        "gzip-bomb",
        "file",
        "a gzip whose one line inflates past 64 MiB (65 MiB of NUL bytes in 65 KB)",
        "error: a line longer than 64 MiB (`reading.max_line_bytes`); read no further",
        gzip_bomb,
        code=2,
        file_name="pairs.jsonl.gz",
        shown=("pairs.jsonl.gz:1: a line longer than 64 MiB (reading.max_line_bytes)",),
    ),
    Case(
        "over-size",
        "file",
        "a file larger than `[reading] max_input_bytes` (here 1,000 bytes)",
        "error: names the limit and the setting; read no further",
        lines(*[GOOD] * 20),
        code=2,
        config="{working}[reading]\nmax_input_bytes = 1000\n",
        shown=("holds more than 1,000 bytes", "reading.max_input_bytes"),
    ),
    Case(
        "bad-lines-galore",
        "file",
        "more bad lines than `[reading] max_bad_lines` (10,000; here 2), as random bytes from a pipe give",
        "error: names the limit; read no further (the list of bad lines stays bounded)",
        lines(GOOD, b"x", b"y", b"z", GOOD),
        code=2,
        config="{working}[reading]\nmax_bad_lines = 2\n",
        shown=("more than 2 bad lines (reading.max_bad_lines; line 4: not JSON",),
    ),
]

ROWS = [
    Case(
        "not-json",
        "row",
        "a line that is not JSON",
        "skipped: `not JSON` with the column; the rest is judged",
        lines(GOOD, b"{'prompt': 'single quotes'}"),
        shown=("pairs.jsonl:2: not JSON",),
        judged=1,
    ),
    Case(
        "not-object",
        "row",
        "a line that is JSON but not an object",
        "skipped: `expected a JSON object, got list`",
        lines(GOOD, [GOOD]),
        shown=("pairs.jsonl:2: expected a JSON object, got list",),
        judged=1,
    ),
    Case(
        "first-line-array",
        "row",
        "a JSON Lines file whose first line is a JSON array",
        "line 1 skipped: `expected a JSON object, got list`; the rest judged, line by line",
        lines([GOOD], GOOD, GOOD),
        shown=("pairs.jsonl:1: expected a JSON object, got list",),
        judged=2,
    ),
    Case(
        "missing-field",
        "row",
        "a row without `response_b`",
        "skipped: `missing field(s): response_b`",
        lines(GOOD, {"prompt": "p", "response_a": "a"}),
        shown=("missing field(s): response_b",),
        judged=1,
    ),
    Case(
        "null-field",
        "row",
        '`"response_b": null`',
        "skipped: `missing field(s): response_b`",
        lines(GOOD, row(response_b=None)),
        shown=("missing field(s): response_b",),
        judged=1,
    ),
    Case(
        "wrong-type",
        "row",
        "a number where text belongs",
        "skipped: `response_a must be a string, got int`",
        lines(GOOD, row(response_a=3)),
        shown=("response_a must be a string, got int",),
        judged=1,
    ),
    Case(
        "surrogate",
        "row",
        'a lone surrogate escape (`"\\ud800"`)',
        "skipped: names the escape and where it is",
        lines(GOOD, b'{"prompt": "p", "response_a": "x\\ud800", "response_b": "y"}'),
        shown=("lone surrogate escape", "at character 2"),
        judged=1,
    ),
    Case(
        "blank-prompt",
        "row",
        "a prompt that is only whitespace",
        "skipped: `the prompt is empty`",
        lines(GOOD, row(prompt=" \n\t")),
        shown=("the prompt is empty",),
        judged=1,
    ),
    Case(
        "both-empty",
        "row",
        "both responses empty",
        "skipped: `both responses are empty`",
        lines(GOOD, row(response_a="", response_b=" ")),
        shown=("both responses are empty",),
        judged=1,
    ),
    Case(
        "one-empty",
        "row",
        "one response empty",
        "judged, with the note `response_a is empty`",
        lines(row(response_a="")),
        shown=("note: response_a is empty",),
        judged=1,
    ),
    Case(
        "identical",
        "row",
        "two identical responses",
        "no verdict: `identical responses` (never a guess)",
        lines(row(response_b="Paris.")),
        shown=("verdict none (identical responses",),
        judged=1,
    ),
    Case(
        "label-case",
        "row",
        "labels `a`, ` B `, `TIE`",
        "read as A, B and tie",
        lines(row(label="a"), row(label=" B "), row(label="TIE")),
        shown=("label A", "label B", "label tie"),
        judged=3,
    ),
    Case(
        "label-unknown",
        "row",
        "a label that is not A, B or tie (`C`, `1`)",
        "skipped: `label must be one of`",
        lines(GOOD, row(label="C"), row(label=1)),
        shown=("pairs.jsonl:2: label must be one of", "pairs.jsonl:3: label must be one of"),
        judged=1,
    ),
    Case(
        "numeric-id", "row", "a number as id", "kept as text (`7`)", lines(row(id=7)), shown=("7: verdict",), judged=1
    ),
    Case(
        "duplicate-ids",
        "row",
        "two pairs with the same id",
        "both judged, with a warning naming the id",
        lines(row(id="same"), row(id="same", response_b="Rome.")),
        shown=("1 id(s) name more than one pair ('same' x2)",),
        judged=2,
    ),
    Case(
        "huge",
        "row",
        "a 1,000,000-character response",
        "judged; the response is cut in the middle to fit, and the note says so",
        lines(row(response_b="word " * 200_000)),
        shown=("note: truncated to fit the context: response_b",),
        judged=1,
    ),
    Case(
        "extra-fields",
        "row",
        "fields the schema does not know",
        "ignored; the pair is judged",
        lines(row(model="gpt-x", score=3)),
        judged=1,
    ),
    Case(
        "control-chars",
        "row",
        "NUL and other control characters in a text",
        "judged as text",
        lines(row(response_b="Ber\u0000lin\u0007.")),
        judged=1,
    ),
    Case(
        "deep-line",
        "row",
        "a line of 200,000 nested arrays",
        "skipped: `nested too deep to read`",
        lines(GOOD, nested(200_000).encode()),
        shown=("pairs.jsonl:2: arrays or objects nested too deep to read",),
        judged=1,
    ),
    Case(
        "deep-field",
        "row",
        "a field holding 200,000 nested arrays",
        "skipped: `nested too deep to read`",
        lines(GOOD, ('{"prompt": "p", "response_a": "a", "response_b": "b", "extra": %s}' % nested(200_000)).encode()),
        shown=("pairs.jsonl:2: arrays or objects nested too deep to read",),
        judged=1,
    ),
    Case(
        "huge-number",
        "row",
        "an id of 5,000 digits (over Python's int-string limit)",
        "skipped: `a number of more than 4300 digits`, put it in quotes",
        lines(GOOD, ('{"id": %s, "prompt": "p", "response_a": "a", "response_b": "b"}' % ("7" * 5000)).encode()),
        shown=("pairs.jsonl:2: a number of more than 4300 digits", "put it in quotes"),
        judged=1,
    ),
    Case(
        "object-category",
        "row",
        '`"category": {"x": 1}`',
        "skipped: `category must be text, got dict`",
        lines(GOOD, row(category={"x": 1})),
        shown=("pairs.jsonl:2: category must be text, got dict",),
        judged=1,
    ),
    Case(
        "list-source",
        "row",
        '`"source": ["a", "b"]`',
        "skipped: `source must be text, got list`",
        lines(GOOD, row(source=["a", "b"])),
        shown=("pairs.jsonl:2: source must be text, got list",),
        judged=1,
    ),
    Case(
        "ansi-id",
        "row",
        "an id holding ANSI escapes and BEL (`\\u001b[2J`, colours)",
        "judged; printed with the control characters as escapes (`\\x1b[2J`), never raw",
        lines(row(id="\u001b[2J\u001b[31mred\u0007")),
        shown=("\\x1b[2J\\x1b[31mred\\x07: verdict A",),
        judged=1,
    ),
]

OUTPUTS = [
    Case(
        "output-is-input",
        "output",
        "`-o` naming the input file",
        "usage error before anything is read or judged",
        lines(GOOD),
        args=["-o", "{dir}/pairs.jsonl"],
        code=2,
        shown=("is the input file", "Name another output file"),
        fate="none judged; the input is left as it was",
    ),
    Case(
        "output-is-input-link",
        "output",
        "`-o` naming a symlink to the input",
        "usage error, as for the input itself",
        lines(GOOD),
        args=["-o", "{dir}/alias.jsonl"],
        links={"alias.jsonl": "{dir}/pairs.jsonl"},
        code=2,
        shown=("is the input file",),
        fate="none judged; the input is left as it was",
    ),
    Case(
        "output-folder-missing",
        "output",
        "`-o` in a folder that does not exist",
        "usage error before anything is judged",
        lines(GOOD),
        args=["-o", "{dir}/nope/out.jsonl"],
        code=2,
        shown=("does not exist: create it first",),
    ),
    Case(
        "output-busy",
        "output",
        "another run writing the same `-o` (it holds `OUTPUT.lock`)",
        "error: another run is writing it; nothing is judged",
        lines(GOOD),
        lock_held=True,
        previous=b"earlier\n",
        code=2,
        shown=("another run is writing", "name another output file"),
        fate="none judged; the other run's `-o` untouched",
    ),
    Case(
        "output-stream",
        "output",
        "`-o /dev/stdout`, `/dev/null` or a pipe",
        "written as judgments come (nothing to rename or lock)",
        lines(GOOD),
        args=["-o", "/dev/null"],
        judged=1,
        fate="1 judged, written to the stream",
    ),
    Case(
        "rerun",
        "output",
        "a run whose `-o` exists",
        "the finished run replaces it whole (one rename)",
        lines(GOOD, GOOD),
        previous=b"earlier\n",
        judged=2,
        fate="2 judged; `-o` replaced by this run's judgments",
    ),
    Case(
        "failed-rerun",
        "output",
        "a re-run whose backend dies after one judgment",
        "error: says how far it got and that a re-run resumes from the cache",
        lines(*(row(prompt=f"Question {i}?") for i in range(3))),
        backend="own",
        engine=("--die-after", "1"),
        args=["--concurrency", "1"],
        previous=b"earlier\n",
        code=1,
        partial=1,
        resume=True,
        shown=(
            "stopped after 1 of 3 judgments",
            "the 1 judgment(s) finished are in",
            "out.jsonl is as it was before this run",
        ),
        fate="the earlier `-o` kept as it was; the finished judgment in `OUTPUT.partial` beside it",
    ),
    Case(
        "failed-rerun-no-cache",
        "output",
        "the same with `--no-cache` and the backend down from the start",
        "error: says the cache is off, so a re-run starts over (never that steps were cached)",
        lines(GOOD),
        backend="dead",
        args=["--no-cache"],
        previous=b"earlier\n",
        code=1,
        shown=("The judgment cache is off, so no finished step was kept", "out.jsonl is as it was before this run"),
        hidden=("every finished step is in the judgment cache", "Every finished step"),
        fate="the earlier `-o` kept as it was; none judged",
    ),
]

BROKEN_BACKEND = '[backends.fake]\nmodel = "openai/fake"\napi_base = "{url}/v1"\napi_key_env = "FAKE_KEY"\n'
WORKING = BROKEN_BACKEND + "constrained = false\nlogprobs = false\nnum_retries = 0\ncontext_chars = 4000\n"
HOSTED_VLLM = (
    '[backends.fake]\nmodel = "hosted_vllm/fake"\napi_base = "{url}/v1"\nnum_retries = 0\ncontext_chars = 4000\n'
)
CONFIGS = [
    Case(
        "toml-syntax",
        "config",
        "a TOML file with a syntax error",
        "error: `not valid TOML`, with the line",
        lines(GOOD),
        config="[backends.fake\n",
        code=1,
        shown=("not valid TOML",),
    ),
    Case(
        "yaml-syntax",
        "config",
        "a YAML file with a syntax error",
        "error: `not valid YAML`",
        lines(GOOD),
        config="backends: [unclosed\n",
        code=1,
        shown=("not valid YAML",),
        config_name="c.yaml",
    ),
    Case(
        "unknown-key",
        "config",
        "a misspelt key (`modle`)",
        "error: `invalid config` naming the key",
        lines(GOOD),
        config=BROKEN_BACKEND + 'modle = "x"\n',
        code=1,
        shown=("invalid config", "modle"),
    ),
    Case(
        "zero-timeout",
        "config",
        "`timeout_s = 0`",
        "error: `invalid config`: must be greater than 0",
        lines(GOOD),
        config=BROKEN_BACKEND + "timeout_s = 0\n",
        code=1,
        shown=("invalid config", "greater than 0"),
    ),
    Case(
        "negative-retries",
        "config",
        "`num_retries = -1`",
        "error: `invalid config`: must be at least 0",
        lines(GOOD),
        config=BROKEN_BACKEND + "num_retries = -1\n",
        code=1,
        shown=("invalid config", "greater than or equal to 0"),
    ),
    Case(
        "unset-key",
        "config",
        "`api_key_env` naming a variable that is not set",
        "error: the variable is not set (its value is never shown)",
        lines(GOOD),
        config=BROKEN_BACKEND.replace("FAKE_KEY", "REFLECTAGENT_TEST_UNSET"),
        code=1,
        shown=("$REFLECTAGENT_TEST_UNSET is not set",),
    ),
    Case(
        "config-missing",
        "config",
        "`--config` naming a file that does not exist",
        "error: cannot read the config",
        lines(GOOD),
        args=["--config", "{dir}/nope.toml"],
        code=1,
        shown=("nope.toml",),
    ),
    Case(
        "secret-in-config",
        "config",
        '`api_key = "sk-..."` written in a backend table',
        "error: names `api_key` and says to use `api_key_env`; the key is not shown",
        lines(GOOD),
        config=BROKEN_BACKEND + f'api_key = "{SECRET}"\n',
        code=1,
        shown=("invalid config", "backends.fake.api_key", "name that variable with api_key_env"),
        hidden=("input_value",),
    ),
    Case(
        "key-in-env-name",
        "config",
        "the key itself written as `api_key_env`",
        "error: api_key_env names a variable; the value is not shown",
        lines(GOOD),
        config=BROKEN_BACKEND.replace("FAKE_KEY", SECRET),
        code=1,
        shown=("api_key_env names an environment variable",),
    ),
    Case(
        "extra-api-key",
        "config",
        '`extra = { api_key = "..." }` beside `api_key_env`',
        "error, one line: `extra.api_key`",
        lines(GOOD),
        config=WORKING + f'extra = {{ api_key = "{SECRET}" }}\n',
        code=1,
        shown=("backends.fake: extra.api_key: a secret is never written in the config",),
        hidden=("multiple values",),
    ),
    Case(
        "extra-conflict",
        "config",
        "`extra = { temperature = 0.5 }` (a field of the backend's own)",
        "error, one line: `extra.temperature` is set by the backend's own field",
        lines(GOOD),
        config=WORKING + "extra = { temperature = 0.5 }\n",
        code=1,
        shown=("extra.temperature: set by the backend's own temperature",),
        hidden=("multiple values",),
    ),
    Case(
        "yaml-secret",
        "config",
        "a YAML syntax error on the line holding a key",
        "error: `not valid YAML` with the line and column, never the line's text",
        lines(GOOD),
        config=f'backends:\n  fake:\n    api_key: "{SECRET}\n  x: [\n',
        code=1,
        shown=("not valid YAML", "at line"),
        config_name="c.yaml",
    ),
    Case(
        "config-device",
        "config",
        "`--config /dev/zero`",
        "error: over 1 MiB, not a config file (no MemoryError)",
        lines(GOOD),
        args=["--config", "/dev/zero"],
        code=1,
        shown=("config /dev/zero is over 1 MiB",),
    ),
    Case(
        "unknown-backend",
        "config",
        "`--backend` naming no configured backend",
        "error: `unknown backend`, listing the known ones",
        lines(GOOD),
        args=["--backend", "nope"],
        code=1,
        shown=("unknown backend 'nope'; known:",),
    ),
    Case(
        "unknown-program",
        "config",
        "`--program` naming no program",
        "error: `unknown program`, listing the known ones",
        lines(GOOD),
        args=["--program", "nope"],
        code=2,
        shown=("unknown program 'nope'; choose from",),
    ),
    Case(
        "dtype-not-embedded",
        "flags",
        "`--dtype` for a backend the library does not serve (an API model)",
        "usage error: `--dtype` only applies to the embedded backend",
        lines(GOOD),
        args=["--dtype", "bfloat16"],
        code=2,
        shown=("--dtype: backend 'fake' cannot take", "only apply to the embedded backend"),
    ),
    Case(
        "dtype-unknown-backend",
        "flags",
        "`--dtype` with `--backend` naming no configured backend",
        "error: `unknown backend`, as without `--dtype`",
        lines(GOOD),
        args=["--dtype", "bfloat16", "--backend", "nope"],
        code=1,
        shown=("unknown backend 'nope'; known:",),
    ),
    Case(
        "zero-concurrency",
        "flags",
        "`--concurrency 0`",
        "usage error: must be at least 1",
        lines(GOOD),
        args=["--concurrency", "0"],
        code=2,
        shown=("--concurrency",),
    ),
    Case(
        "negative-limit",
        "flags",
        "`--limit -1`",
        "usage error: must be at least 1 (it never drops pairs from the end)",
        lines(GOOD),
        args=["--limit", "-1"],
        code=2,
        shown=("--limit",),
    ),
    Case(
        "hang",
        "backend",
        "a backend that never answers, `timeout_s = 1`",
        "error: names `timeout_s` (the knob the config has) and the tries; a re-run resumes",
        lines(GOOD),
        backend="own",
        engine=("--fault", "hang"),
        config=WORKING + "timeout_s = 1\n",
        code=1,
        resume=True,
        shown=(
            "timed out: backend 'fake' gave no answer within timeout_s = 1 s (1 try: num_retries = 0)",
            "raise timeout_s in [backends.fake]",
        ),
        hidden=("Timeouts(read",),
    ),
    Case(
        "no-vllm-routes",
        "backend",
        "a `hosted_vllm` server without `/v1/models` and `/tokenize` (an OpenAI-compatible "
        "server that is not vLLM, or a proxy)",
        "judged within `context_chars`; one warning names the missing route and "
        "what to set (`context_tokens`, `context_chars`)",
        lines(GOOD, row(id="2")),
        backend="own",
        engine=("--routes", "none"),
        config=HOSTED_VLLM,
        judged=2,
        logged=("backend 'fake': the server has no GET /v1/models", "Set context_tokens"),
    ),
    Case(
        "no-input",
        "flags",
        "no file, no `--prompt`, no `--sample`",
        "usage error: give exactly one of them",
        None,
        code=2,
        shown=("give exactly one of",),
    ),
    Case(
        "prompt-without-b",
        "flags",
        "`--prompt` and `--a` without `--b`",
        "usage error: `--prompt needs both --a and --b`",
        None,
        args=["--prompt", "q", "--a", "x"],
        code=2,
        shown=("--prompt needs both --a and --b",),
    ),
]

CLI_CASES = FILES + ROWS + OUTPUTS + CONFIGS


@pytest.fixture(scope="module")
def engine():
    fake = Engine()
    yield fake
    fake.stop()


HOLD_LOCK = "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)"


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_input(case: Case, engine, tmp_path, monkeypatch, caplog):
    from reflectagent.server import free_port

    monkeypatch.setattr("reflectagent.backends._warned", set())  # a warning told once per process: this row's own
    monkeypatch.setenv("FAKE_KEY", "k")
    monkeypatch.delenv("REFLECTAGENT_TEST_UNSET", raising=False)
    own = Engine(*case.engine) if case.backend == "own" else None
    url = own.url if own else f"http://127.0.0.1:{free_port()}" if case.backend == "dead" else engine.url
    path = tmp_path / case.file_name
    data = case.data() if callable(case.data) else case.data
    if case.fifo:
        os.mkfifo(path)
    elif data is not None:
        path.write_bytes(data)
    for name, target in case.links.items():
        (tmp_path / name).symlink_to(target.replace("{dir}", str(tmp_path)))
    out = tmp_path / "out.jsonl"
    if case.previous is not None:
        out.write_bytes(case.previous)
    config = tmp_path / case.config_name
    config.write_text((case.config or WORKING).replace("{working}", WORKING).replace("{url}", url))
    args = [a.replace("{dir}", str(tmp_path)) for a in case.args]
    given = [str(path)] if data is not None else []
    command = [
        "judge",
        *given,
        "--program",
        "genrm",
        "--backend",
        "fake",
        "--config",
        str(config),
        "--cache-dir",
        str(tmp_path / "cache"),
        *args,
        *([] if "-o" in args else ["-o", str(out)]),
    ]
    writer = threading.Thread(target=path.write_bytes, args=(data,)) if case.fifo else None
    holder = (
        subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{out}.lock"], stdout=subprocess.PIPE, text=True)
        if case.lock_held
        else None
    )
    try:
        if writer:
            writer.start()
        if holder:
            assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, command)
    finally:
        if writer:
            writer.join(10)
        if holder:
            holder.kill()
            holder.wait()
        if own:
            own.stop()
    output = result.stdout + result.stderr
    assert result.exit_code == case.code, output
    assert "Traceback" not in output and (RESUME in output) == case.resume, output
    for text in case.shown:
        assert text in output, f"{text!r} not in:\n{output}"
    for text in (*case.hidden, SECRET, "\x1b", "\x07"):  # nothing hidden, no secret, no raw escape or bell
        assert text not in output, f"{text!r} in:\n{output}"
    for text in case.logged:
        assert caplog.text.count(text) == 1, f"{text!r} not logged once:\n{caplog.text}"
    # what becomes of the data: the input reads the same; a failed run leaves -o as it was, a finished one holds it all
    if data is not None and not case.fifo:
        assert path.read_bytes() == data
    if case.code:
        assert (out.read_bytes() if out.exists() else None) == case.previous
    if case.judged is not None:
        assert f"pairs: {case.judged} judged" in result.stdout, output
        written = (
            [json.loads(line) for line in out.read_text().splitlines()]
            if "-o" not in case.args
            else [None] * case.judged
        )
        assert len(written) == case.judged and all(
            w["judgment"]["preference"] for w in written if w and not w["pair"]["response_b"] == w["pair"]["response_a"]
        )
    partial = out.with_name("out.jsonl.partial")
    assert (len(partial.read_text().splitlines()) if partial.exists() else None) == case.partial
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p != config and SECRET.encode() in p.read_bytes()]
    assert leaked == []


# ---- requests to the reward service (``reflectagent serve-rm``), through an in-process client ----------


@dataclass
class Request:
    id: str
    given: str
    behaviour: str
    route: str
    body: object  # JSON, or a str sent as it is
    status: int
    message: str  # in the answer (lower case)
    reason: str  # its label in /metrics' reflectagent_request_errors_total
    judge: str = "score"  # "score": a model-free judge; "dead": GenRM on a backend nobody serves; "refusing", "buggy"
    fate: str | None = None
    max_body_bytes: int = 2000

    @property
    def what_becomes_of_the_data(self) -> str:
        return self.fate or f"none judged; counted in `/metrics` as `{self.reason}`"


REQUESTS = [
    Request(
        "missing-query",
        "`/get_reward` without `query`",
        "422, naming the field",
        "/get_reward",
        {"prompts": ["q"]},
        422,
        "query",
        "invalid_request",
    ),
    Request(
        "empty-query",
        "`/get_reward` with an empty `query`",
        "400: `query is empty`",
        "/get_reward",
        {"query": [], "prompts": []},
        400,
        "query is empty",
        "bad_input",
    ),
    Request(
        "length-mismatch",
        "`query` and `prompts` of different lengths",
        "400: they must be the same length",
        "/get_reward",
        {"query": ["q1", "q2"], "prompts": ["q"]},
        400,
        "same length",
        "bad_input",
    ),
    Request(
        "query-without-prompt",
        "a query that does not start with its prompt",
        "400: says which",
        "/get_reward",
        {"query": ["x1"], "prompts": ["q"]},
        400,
        "does not start with its prompt",
        "bad_input",
    ),
    Request(
        "body-too-big",
        "a body over `--max-body-bytes`",
        "413, with the limit",
        "/get_reward",
        {"query": ["q" * 3000], "prompts": ["q"]},
        413,
        "body over 2000 bytes",
        "body_too_big",
    ),
    Request(
        "one-response",
        "`/v1/rank` with one response",
        "400: needs two or more",
        "/v1/rank",
        {"prompt": "q", "responses": ["1"]},
        400,
        "responses",
        "bad_input",
    ),
    Request(
        "blank-prompt-request",
        "`/v1/judge` with a blank prompt",
        "400: the prompt is empty",
        "/v1/judge",
        {"prompt": " ", "response_a": "1", "response_b": "2"},
        400,
        "empty",
        "bad_input",
    ),
    Request(
        "not-json-body",
        "a body that is not JSON",
        "422, saying to send a JSON object",
        "/v1/judge",
        "{not json",
        422,
        "json",
        "invalid_request",
    ),
    Request(
        "nan-body",
        "`NaN` in a body (Python's JSON reads it; JSON has no such number)",
        "400: not a JSON number",
        "/v1/judge",
        '{"prompt": NaN, "response_a": "1", "response_b": "2"}',
        400,
        "nan, which is not a json number",
        "not_finite",
    ),
    Request(
        "infinity-body",
        "`Infinity` in a field the route ignores",
        "400, as for NaN",
        "/get_reward",
        '{"query": ["q1"], "prompts": ["q"], "x": -Infinity}',
        400,
        "-infinity, which is not a json number",
        "not_finite",
    ),
    Request(
        "surrogate-body",
        'a lone surrogate escape (`"\\ud800"`) in a text',
        "400: names the field and the character",
        "/v1/judge",
        '{"prompt": "q\\ud800", "response_a": "1", "response_b": "2"}',
        400,
        "prompt holds a lone surrogate escape at character 2",
        "not_text",
    ),
    Request(
        "deep-body",
        "a body of 100,000 nested arrays",
        "400: cannot be read as JSON",
        "/v1/judge",
        nested(100_000),
        400,
        "could not be read as json",
        "bad_json",
        max_body_bytes=1 << 20,
    ),
    Request(
        "too-many-judgments",
        "`/get_reward` with 100 groups of 8 distinct responses (2,800 judgments in a 12 KB body)",
        "413: names `--max-judgments` (default 2,048)",
        "/get_reward",
        {
            "query": [f"{g}:{i}" for g in range(100) for i in range(8)],
            "prompts": [f"{g}:" for g in range(100) for _ in range(8)],
        },
        413,
        "needs 2800 judgments, over --max-judgments (2048)",
        "too_many_judgments",
        max_body_bytes=1 << 20,
    ),
    Request(
        "dead-backend",
        "a request while the judge's backend is down",
        "503 with `Retry-After` and the backend's error",
        "/v1/judge",
        {"prompt": "q", "response_a": "1", "response_b": "2"},
        503,
        "the judge's backend did not answer",
        "backend_unavailable",
        judge="dead",
        fate="its judgment stops; counted as `backend_unavailable`; the same request later is judged",
    ),
    Request(
        "backend-refuses",
        "a backend that refuses the request (an error that retrying does not fix)",
        "502 with its error",
        "/v1/judge",
        {"prompt": "q", "response_a": "1", "response_b": "2"},
        502,
        "the judge's backend failed",
        "backend_error",
        judge="refusing",
    ),
    Request(
        "judge-bug",
        "a judge that raises an unexpected error",
        "500 with a reason (details in the log), never bare",
        "/v1/judge",
        {"prompt": "q", "response_a": "1", "response_b": "2"},
        500,
        "judging failed (runtimeerror)",
        "internal",
        judge="buggy",
    ),
]


class RefusingJudge(Judge):
    """A backend's refusal (an invalid request: not transient)."""

    def decide(self, pair):
        from dspy.utils.exceptions import LMInvalidRequestError

        raise LMInvalidRequestError("the model refused the request", status=400)


class BuggyJudge(Judge):
    def decide(self, pair):
        raise RuntimeError("a bug")


def rewarder_for(kind: str):
    from dspy.utils.dummies import DummyLM
    from fakes import ScoreJudge

    from reflectagent.backends import resolve_backend
    from reflectagent.config import BackendConfig, Settings
    from reflectagent.rl import Rewarder
    from reflectagent.server import free_port

    if kind == "dead":
        settings = Settings(
            backends={
                "dead": BackendConfig(
                    model="openai/fake",
                    api_base=f"http://127.0.0.1:{free_port()}/v1",
                    api_key_env="FAKE_KEY",
                    constrained=False,
                    logprobs=False,
                    num_retries=0,
                )
            }
        )
        return Rewarder("genrm", lm=resolve_backend("dead", settings))
    judge = {"score": ScoreJudge, "refusing": RefusingJudge, "buggy": BuggyJudge}[kind]()
    return Rewarder(judge, lm=DummyLM([]))


@pytest.mark.parametrize("case", REQUESTS, ids=[c.id for c in REQUESTS])
def test_bad_request(case: Request, monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    from reflectagent.cache import JudgmentCache, use_cache
    from reflectagent.rl.service import create_app

    monkeypatch.setenv("FAKE_KEY", "k")
    http = TestClient(
        create_app(rewarder_for(case.judge), max_body_bytes=case.max_body_bytes), raise_server_exceptions=False
    )
    with use_cache(JudgmentCache(tmp_path / "cache")):
        answer = (
            http.post(
                case.route,
                content=case.body,
                headers={"content-type": "application/json"} if case.id != "not-json-body" else {},
            )
            if isinstance(case.body, str)
            else http.post(case.route, json=case.body)
        )
    assert answer.status_code == case.status and case.message in answer.text.lower(), answer.text
    assert answer.json()["reason"] == case.reason
    if case.status == 503:
        assert answer.headers["Retry-After"] == "5"
    counted = (
        f'reflectagent_request_errors_total{{reason="{case.reason}",route="{case.route}",status="{case.status}"}} 1.0'
    )
    assert counted in http.get("/metrics").text


# ---- connections to the reward service, over real HTTP on loopback ----------------------------------------

CONNECTIONS = [
    (
        "slow-headers",
        "a client that sends its request head a byte at a time (a slowloris), 20 connections",
        "each closed once `--header-timeout` (10 s; 0.5 s here) passes without a complete head; other requests are answered",
        "none judged; nothing held",
        b"POST /v1/judge HTTP/1.1\r\nHost: x\r\n",  # and never the blank line that ends the head
    ),
    (
        "slow-body",
        "a client that sends its request head whole and then a few bytes of its body, 20 connections",
        "each closed once `--body-timeout` (60 s; 0.5 s here) passes after its head without the whole body; other "
        "requests are answered",
        "none judged; nothing held",
        b"POST /v1/judge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"prompt": "q", ',  # and never the rest of the 1000 bytes
    ),
]


@pytest.mark.parametrize("case", CONNECTIONS, ids=[c[0] for c in CONNECTIONS])
def test_slow_connection(case):
    import contextvars
    import socket
    import time

    import httpx
    import uvicorn
    from dspy.utils.dummies import DummyLM
    from fakes import ScoreJudge

    from reflectagent.rl.http import service_config
    from reflectagent.rl.service import create_app
    from reflectagent.rl import Rewarder
    from reflectagent.server import free_port

    port = free_port()
    server = uvicorn.Server(
        service_config(
            create_app(Rewarder(ScoreJudge(), lm=DummyLM([]))),
            host="127.0.0.1",
            port=port,
            header_timeout_s=0.5,
            body_timeout_s=0.5,
        )
    )
    thread = threading.Thread(target=contextvars.copy_context().run, args=(server.run,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        started = time.monotonic()
        for sock in slow:
            sock.sendall(case[4])
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/judge", json={"prompt": "q", "response_a": "2", "response_b": "1"})
        closed = 0
        for sock in slow:
            sock.settimeout(5)
            try:
                while sock.recv(1024):  # a close reads as b""; a reset as an error
                    pass
            except ConnectionResetError:
                pass
            closed += 1
        waited = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
        server.should_exit = True
        thread.join(10)
    assert ok.status_code == 200 and closed == 20 and 0.4 < waited < 4


def render_table() -> str:
    out = [
        "# Bad input",
        "",
        "What each kind of bad input does, and what becomes of the data. Every row is a test in",
        "`tests/test_bad_input.py` (its id is the test's parameter), run through the real `reflectagent judge`",
        "command with `-o`, or the reward service's routes. For every command row the test checks that the input",
        "reads the same afterwards, that a failed run leaves the previous `-o` as it was (and its finished",
        "judgments in `OUTPUT.partial` beside it), that a finished run wrote every judgment, and that nothing",
        "printed holds a traceback, a raw control character or the secret planted in some configs.",
        "",
        "A bad line never stops a file: it is skipped with its line number and reason, and the rest is judged.",
        "A file is read within bounds (`[reading]` in the config: `max_line_bytes`, 64 MiB, `max_input_bytes`,",
        "4 GiB after decompression, and `max_bad_lines`, 10,000); over one is an error naming it, before anything",
        "is judged. `-o` is written beside its target and renamed",
        'into place when the run ends, under a lock (`OUTPUT.lock`). An input error never says "run the same',
        'command again to resume": that advice is only given when the backend went away or was slow, where a',
        "re-run can succeed, and only with the judgment cache on.",
        "",
        "| id | kind | given | what happens | what becomes of the data |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {c.id} | {c.group} | {c.given} | {c.behaviour} | {c.what_becomes_of_the_data} |" for c in CLI_CASES]
    out += [f"| {r.id} | request | {r.given} | {r.behaviour} | {r.what_becomes_of_the_data} |" for r in REQUESTS]
    out += [f"| {c[0]} | connection | {c[1]} | {c[2]} | {c[3]} |" for c in CONNECTIONS]
    out += [
        "",
        "Every request row's answer carries a `reason`, counted in `/metrics` as",
        "`reflectagent_request_errors_total{route, status, reason}`.",
        "",
        "Faults of the backend (errors, resets, hangs, broken replies, a server that dies) are in",
        "`tests/test_faults.py`; a cache folder that cannot be written or is full is an error at start, before",
        "any call (same file). Two real `judge` processes writing one `-o` at once, and the same data-loss cases",
        "as separate processes, are in `tests/test_output.py`; hostile lines through `eval`, `finetune data`",
        "and the teacher reader in `tests/test_hostile_lines.py`; a planted key through every failing command",
        "in `tests/test_secrets.py`.",
        "",
    ]
    return "\n".join(out)


def test_the_docs_table_is_this_table():
    assert (ROOT / "docs" / "bad-input.md").read_text(encoding="utf-8") == render_table(), (
        "regenerate it: python tests/test_bad_input.py > docs/bad-input.md"
    )
    assert len(CLI_CASES) + len(REQUESTS) + len(CONNECTIONS) >= 80


if __name__ == "__main__":
    print(render_table(), end="")
