"""Bad input, one row each: what a user gives, what happens, checked through the real command (and the
reward service's routes). ``docs/bad-input.md`` is this table; a test keeps the two the same
(``python tests/test_bad_input.py > docs/bad-input.md`` writes it).

Nothing here may guess: a bad line is skipped with its number and reason and the rest is judged, a
file or config that cannot be used is an error that says what to fix, and no input error ever says
"run again to resume" (a re-run would fail the same way)."""

from __future__ import annotations

import codecs
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fakes import Engine
from typer.testing import CliRunner

from reflectagent.cli import app

ROOT = Path(__file__).resolve().parents[1]

RESUME = "run the same command again to resume"
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
    data: bytes | None = None  # the pairs file's bytes (None: no file is made)
    args: list[str] = field(default_factory=list)  # extra arguments; {dir} is the test's folder
    config: str | None = None  # TOML for the fake backend's config (None: the working one)
    code: int = 0
    shown: tuple[str, ...] = ()  # what the output must say
    judged: int | None = None  # pairs judged, when it runs
    file_name: str = "pairs.jsonl"


FILES = [
    Case("utf8-bom", "file", "a UTF-8 file saved with a byte order mark", "read as UTF-8; the mark is not part of line 1",
         codecs.BOM_UTF8 + lines(GOOD), judged=1),
    Case("crlf", "file", "Windows line endings (CRLF)", "read as usual", lines(GOOD).replace(b"\n", b"\r\n") * 2, judged=2),
    Case("latin-1", "file", "a line in Latin-1 (or another 8-bit encoding)",
         "that line is skipped with its byte offset and how to convert the file; the rest is judged",
         lines(GOOD) + json.dumps(row(prompt="Où est Paris ?"), ensure_ascii=False).encode("latin-1") + b"\n",
         shown=("pairs.jsonl:2: not UTF-8 (byte 14 of the line): save the file as UTF-8", "iconv -f latin1"), judged=1),
    Case("utf-16", "file", "a UTF-16 file (with its byte order mark, as Windows tools write it)", "decoded and read",
         lines(GOOD).decode().encode("utf-16"), judged=1),
    Case("gzip", "file", "a gzip-compressed file (`pairs.jsonl.gz`)", "decompressed and read", gzip.compress(lines(GOOD, GOOD)),
         judged=2, file_name="pairs.jsonl.gz"),
    Case("json-array", "file", "one JSON array of pairs instead of JSON Lines", "read; its items are numbered like lines",
         json.dumps([GOOD, row(id="x")], indent=2).encode(), judged=2, file_name="pairs.json"),
    Case("empty", "file", "an empty file", "error: the file holds no pairs", b"", code=2, shown=("holds no pairs (it is empty or blank)",)),
    Case("blank", "file", "only blank lines", "error: the file holds no pairs", b"\n  \n\t\n", code=2, shown=("holds no pairs",)),
    Case("folder", "file", "a folder instead of a file", "error: it is a folder; give a JSONL file", None, args=["{dir}"], code=2,
         shown=("is a folder: give a JSONL file",)),
    Case("missing", "file", "a path that does not exist", "error: no such file", None, args=["{dir}/nope.jsonl"], code=2,
         shown=("no such file",)),
    Case("all-bad", "file", "a file whose every line is bad", "each line is listed, then an error: every line was skipped",
         b"{not json\n[1]\n", code=2, shown=("pairs.jsonl:1: not JSON", "every line was skipped (2, above)")),
]

ROWS = [
    Case("not-json", "row", "a line that is not JSON", "skipped: `not JSON` with the column; the rest is judged",
         lines(GOOD, b"{'prompt': 'single quotes'}"), shown=("pairs.jsonl:2: not JSON",), judged=1),
    Case("not-object", "row", "a line that is JSON but not an object", "skipped: `expected a JSON object, got list`",
         lines(GOOD, [GOOD]), shown=("pairs.jsonl:2: expected a JSON object, got list",), judged=1),
    Case("missing-field", "row", "a row without `response_b`", "skipped: `missing field(s): response_b`",
         lines(GOOD, {"prompt": "p", "response_a": "a"}), shown=("missing field(s): response_b",), judged=1),
    Case("null-field", "row", "`\"response_b\": null`", "skipped: `missing field(s): response_b`",
         lines(GOOD, row(response_b=None)), shown=("missing field(s): response_b",), judged=1),
    Case("wrong-type", "row", "a number where text belongs", "skipped: `response_a must be a string, got int`",
         lines(GOOD, row(response_a=3)), shown=("response_a must be a string, got int",), judged=1),
    Case("surrogate", "row", 'a lone surrogate escape (`"\\ud800"`)', "skipped: names the escape and where it is",
         lines(GOOD, b'{"prompt": "p", "response_a": "x\\ud800", "response_b": "y"}'),
         shown=("lone surrogate escape", "at character 2"), judged=1),
    Case("blank-prompt", "row", "a prompt that is only whitespace", "skipped: `the prompt is empty`",
         lines(GOOD, row(prompt=" \n\t")), shown=("the prompt is empty",), judged=1),
    Case("both-empty", "row", "both responses empty", "skipped: `both responses are empty`",
         lines(GOOD, row(response_a="", response_b=" ")), shown=("both responses are empty",), judged=1),
    Case("one-empty", "row", "one response empty", "judged, with the note `response_a is empty`",
         lines(row(response_a="")), shown=("note: response_a is empty",), judged=1),
    Case("identical", "row", "two identical responses", "no verdict: `identical responses` (never a guess)",
         lines(row(response_b="Paris.")), shown=("verdict none (identical responses",), judged=1),
    Case("label-case", "row", "labels `a`, ` B `, `TIE`", "read as A, B and tie",
         lines(row(label="a"), row(label=" B "), row(label="TIE")), shown=("label A", "label B", "label tie"), judged=3),
    Case("label-unknown", "row", "a label that is not A, B or tie (`C`, `1`)", "skipped: `label must be one of`",
         lines(GOOD, row(label="C"), row(label=1)), shown=("pairs.jsonl:2: label must be one of", "pairs.jsonl:3: label must be one of"),
         judged=1),
    Case("numeric-id", "row", "a number as id", "kept as text (`7`)", lines(row(id=7)), shown=("7: verdict",), judged=1),
    Case("duplicate-ids", "row", "two pairs with the same id", "both judged, with a warning naming the id",
         lines(row(id="same"), row(id="same", response_b="Rome.")), shown=("1 id(s) name more than one pair ('same' x2)",), judged=2),
    Case("huge", "row", "a 1,000,000-character response", "judged; the response is cut in the middle to fit, and the note says so",
         lines(row(response_b="word " * 200_000)), shown=("note: truncated to fit the context: response_b",), judged=1),
    Case("extra-fields", "row", "fields the schema does not know", "ignored; the pair is judged",
         lines(row(model="gpt-x", score=3)), judged=1),
    Case("control-chars", "row", "NUL and other control characters in a text", "judged as text",
         lines(row(response_b="Ber\u0000lin\u0007.")), judged=1),
]

BROKEN_BACKEND = '[backends.fake]\nmodel = "openai/fake"\napi_base = "{url}/v1"\napi_key_env = "FAKE_KEY"\n'
CONFIGS = [
    Case("toml-syntax", "config", "a TOML file with a syntax error", "error: `not valid TOML`, with the line", lines(GOOD),
         config="[backends.fake\n", code=1, shown=("not valid TOML",)),
    Case("yaml-syntax", "config", "a YAML file with a syntax error", "error: `not valid YAML`", lines(GOOD),
         config="backends: [unclosed\n", code=1, shown=("not valid YAML",), file_name="pairs.jsonl"),
    Case("unknown-key", "config", "a misspelt key (`modle`)", "error: `invalid config` naming the key", lines(GOOD),
         config=BROKEN_BACKEND + 'modle = "x"\n', code=1, shown=("invalid config", "modle")),
    Case("zero-timeout", "config", "`timeout_s = 0`", "error: `invalid config`: must be greater than 0", lines(GOOD),
         config=BROKEN_BACKEND + "timeout_s = 0\n", code=1, shown=("invalid config", "greater than 0")),
    Case("negative-retries", "config", "`num_retries = -1`", "error: `invalid config`: must be at least 0", lines(GOOD),
         config=BROKEN_BACKEND + "num_retries = -1\n", code=1, shown=("invalid config", "greater than or equal to 0")),
    Case("unset-key", "config", "`api_key_env` naming a variable that is not set", "error: the variable is not set (its value is never shown)",
         lines(GOOD), config=BROKEN_BACKEND.replace("FAKE_KEY", "REFLECTAGENT_TEST_UNSET") , code=1,
         shown=("$REFLECTAGENT_TEST_UNSET is not set",)),
    Case("config-missing", "config", "`--config` naming a file that does not exist", "error: cannot read the config", lines(GOOD),
         args=["--config", "{dir}/nope.toml"], code=1, shown=("nope.toml",)),
    Case("unknown-backend", "config", "`--backend` naming no configured backend", "error: `unknown backend`, listing the known ones",
         lines(GOOD), args=["--backend", "nope"], code=1, shown=("unknown backend 'nope'; known:",)),
    Case("unknown-program", "config", "`--program` naming no program", "error: `unknown program`, listing the known ones", lines(GOOD),
         args=["--program", "nope"], code=2, shown=("unknown program 'nope'; choose from",)),
    Case("dtype-not-embedded", "flags", "`--dtype` for a backend the library does not serve (an API model)",
         "usage error: `--dtype` only applies to the embedded backend", lines(GOOD), args=["--dtype", "bfloat16"], code=2,
         shown=("--dtype: backend 'fake' cannot take", "only apply to the embedded backend")),
    Case("dtype-unknown-backend", "flags", "`--dtype` with `--backend` naming no configured backend",
         "error: `unknown backend`, as without `--dtype`", lines(GOOD), args=["--dtype", "bfloat16", "--backend", "nope"], code=1,
         shown=("unknown backend 'nope'; known:",)),
    Case("zero-concurrency", "flags", "`--concurrency 0`", "usage error: must be at least 1", lines(GOOD), args=["--concurrency", "0"],
         code=2, shown=("--concurrency",)),
    Case("negative-limit", "flags", "`--limit -1`", "usage error: must be at least 1 (it never drops pairs from the end)", lines(GOOD),
         args=["--limit", "-1"], code=2, shown=("--limit",)),
    Case("no-input", "flags", "no file, no `--prompt`, no `--sample`", "usage error: give exactly one of them", None, code=2,
         shown=("give exactly one of",)),
    Case("prompt-without-b", "flags", "`--prompt` and `--a` without `--b`", "usage error: `--prompt needs both --a and --b`", None,
         args=["--prompt", "q", "--a", "x"], code=2, shown=("--prompt needs both --a and --b",)),
]

CLI_CASES = FILES + ROWS + CONFIGS


@pytest.fixture(scope="module")
def engine():
    fake = Engine()
    yield fake
    fake.stop()


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_input(case: Case, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    monkeypatch.delenv("REFLECTAGENT_TEST_UNSET", raising=False)
    path = tmp_path / case.file_name
    if case.data is not None:
        path.write_bytes(case.data)
    config = tmp_path / ("c.yaml" if case.id == "yaml-syntax" else "c.toml")
    config.write_text((case.config or BROKEN_BACKEND + "constrained = false\nlogprobs = false\nnum_retries = 0\ncontext_chars = 4000\n")
                      .replace("{url}", engine.url))
    args = [a.replace("{dir}", str(tmp_path)) for a in case.args]
    given = [str(path)] if case.data is not None else []
    command = ["judge", *given, "--program", "genrm", "--backend", "fake", "--config", str(config),
               "--cache-dir", str(tmp_path / "cache"), *args]
    result = CliRunner().invoke(app, command)
    output = result.stdout + result.stderr
    assert result.exit_code == case.code, output
    assert "Traceback" not in output and RESUME not in output, output
    for text in case.shown:
        assert text in output, f"{text!r} not in:\n{output}"
    if case.judged is not None:
        assert f"pairs: {case.judged} judged" in result.stdout, output


# ---- requests to the reward service (``reflectagent serve-rm``), through an in-process client ----------

REQUESTS = [
    ("missing-query", "`/get_reward` without `query`", "422, naming the field", "/get_reward", {"prompts": ["q"]}, 422, "query"),
    ("empty-query", "`/get_reward` with an empty `query`", "400: `query is empty`", "/get_reward", {"query": [], "prompts": []}, 400,
     "query is empty"),
    ("length-mismatch", "`query` and `prompts` of different lengths", "400: they must be the same length", "/get_reward",
     {"query": ["q1", "q2"], "prompts": ["q"]}, 400, "same length"),
    ("query-without-prompt", "a query that does not start with its prompt", "400: says which", "/get_reward",
     {"query": ["x1"], "prompts": ["q"]}, 400, "does not start with its prompt"),
    ("body-too-big", "a body over `--max-body-bytes`", "413, with the limit", "/get_reward", {"query": ["q" * 3000], "prompts": ["q"]},
     413, "body over 2000 bytes"),
    ("one-response", "`/v1/rank` with one response", "400: needs two or more", "/v1/rank", {"prompt": "q", "responses": ["1"]}, 400,
     "responses"),
    ("blank-prompt-request", "`/v1/judge` with a blank prompt", "400: the prompt is empty", "/v1/judge",
     {"prompt": " ", "response_a": "1", "response_b": "2"}, 400, "empty"),
    ("not-json-body", "a body that is not JSON", "422", "/v1/judge", "{not json", 422, "json"),
]


@pytest.mark.parametrize("case", REQUESTS, ids=[c[0] for c in REQUESTS])
def test_bad_request(case):
    from dspy.utils.dummies import DummyLM
    from fakes import ScoreJudge
    from fastapi.testclient import TestClient

    from reflectagent.cli.serve_rm import create_app
    from reflectagent.rl import Rewarder

    _, _, _, route, body, status, message = case
    http = TestClient(create_app(Rewarder(ScoreJudge(), lm=DummyLM([])), max_body_bytes=2000))
    answer = http.post(route, content=body) if isinstance(body, str) else http.post(route, json=body)
    assert answer.status_code == status and message in answer.text.lower(), answer.text


def render_table() -> str:
    out = ["# Bad input", "",
           "What each kind of bad input does. Every row is a test in `tests/test_bad_input.py` (its id is the test's",
           "parameter), run through the real `reflectagent judge` command, or the reward service's routes.", "",
           "A bad line never stops a file: it is skipped with its line number and reason, and the rest is judged.",
           "An input error never says \"run the same command again to resume\": that advice is only given when",
           "the backend went away or was slow, where a re-run can succeed.", "",
           "| id | kind | given | what happens |", "|---|---|---|---|"]
    out += [f"| {c.id} | {c.group} | {c.given} | {c.behaviour} |" for c in CLI_CASES]
    out += [f"| {r[0]} | request | {r[1]} | {r[2]} |" for r in REQUESTS]
    out += ["", "Faults of the backend (errors, resets, hangs, broken replies, a server that dies) are in",
            "`tests/test_faults.py`; a cache folder that cannot be written or is full is an error at start, before",
            "any call (same file).", ""]
    return "\n".join(out)


def test_the_docs_table_is_this_table():
    assert (ROOT / "docs" / "bad-input.md").read_text(encoding="utf-8") == render_table(), \
        "regenerate it: python tests/test_bad_input.py > docs/bad-input.md"
    assert len(CLI_CASES) + len(REQUESTS) >= 30


if __name__ == "__main__":
    print(render_table(), end="")
