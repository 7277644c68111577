"""Untrusted text reaches the terminal with its control characters shown as escapes: ids, analyses a model wrote
(which may quote a response), raw output that did not parse, bad-line reasons and error messages."""

from __future__ import annotations

from reflectagent.pairs import Pair
from reflectagent.reading import BadLine
from reflectagent.results import Analysis, Judgment, Reflection
from reflectagent.terminal import visible

ATTACK = "\u001b[2J\u001b[31mred\u0007\rover\u202eevil\u200b\x9b"


def test_control_format_and_separator_characters_are_escaped_and_text_is_not():
    assert visible(ATTACK) == "\\x1b[2J\\x1b[31mred\\x07\\rover\\u202eevil\\u200b\\x9b"
    assert visible("Paris, Zürich, 東京, emoji 🙂, tab\there") == "Paris, Zürich, 東京, emoji 🙂, tab\\there"
    assert visible("two\nlines\x1b", keep="\n") == "two\nlines\\x1b" and visible("a\u2028b") == "a\\u2028b"
    assert visible("lone \ud800") == "lone \\ud800"


def test_what_judge_prints_of_a_judgment_holds_no_raw_control_character():
    from reflectagent.cli.judge import judgment_lines

    pair = Pair(prompt="q", response_a="a", response_b="b", id=ATTACK, label="A")
    judgment = Judgment(
        preference=None,
        reason="unparsed",
        analyses=(
            Analysis(text=f"Response A says {ATTACK}", preference="A", swapped=False, parsed=True, raw=""),
            Analysis(text="", preference=None, swapped=True, parsed=False, raw=ATTACK, error=f"not JSON: {ATTACK}"),
        ),
        reflections=(Reflection(text=ATTACK, more_reliable=0, first=0, second=1, parsed=True, raw=""),),
    )
    printed = "\n".join(judgment_lines(pair, judgment, show_analyses=True))
    assert not any(ord(c) < 32 and c != "\n" or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u200b" for c in printed), printed
    assert printed.count("\\x1b[2J") == 4  # the id, the analysis, the unparsed output, the reflection


def test_a_bad_line_and_an_error_show_their_escapes():
    assert str(BadLine(f"p{ATTACK}.jsonl", 3, "x")).startswith("p\\x1b[2J")
    from typer.testing import CliRunner

    from reflectagent.cli import app

    result = CliRunner().invoke(
        app, ["judge", "--prompt", "q", "--a", "x", "--b", "y", "--load", f"/nope/{ATTACK}.json"]
    )
    assert result.exit_code == 2 and "\\x1b[2J" in result.stderr and "\x1b" not in result.stderr


def test_the_command_line_log_shows_escapes(capsys):
    import logging

    from reflectagent.cli import VisibleFormatter

    record = logging.LogRecord("reflectagent.x", logging.WARNING, __file__, 1, "pair %s gives no rows", (ATTACK,), None)
    line = VisibleFormatter("%(levelname)s %(message)s").format(record)
    assert line.startswith("WARNING pair \\x1b[2J") and "\x1b" not in line and "\u202e" not in line


def test_a_log_record_is_one_line_whatever_its_message_holds():
    """A newline from an id or a model's output is ``\\n`` in the log: no forged record; a traceback keeps its lines,
    its exception's message escaped."""
    import logging
    import sys

    from reflectagent.cli import VisibleFormatter

    forged = "x\n2025-01-01 00:00:00 ERROR reflectagent.judge: forged line"
    formatter = VisibleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("reflectagent.x", logging.WARNING, __file__, 1, "pair %s gives no rows", (forged,), None)
    line = formatter.format(record)
    assert "\n" not in line and line.endswith(
        "pair x\\n2025-01-01 00:00:00 ERROR reflectagent.judge: forged line gives no rows"
    )
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError(f"bad id {forged}") from inner
    except ValueError:
        record = logging.LogRecord(
            "reflectagent.x", logging.ERROR, __file__, 1, "failed: %s", (forged,), sys.exc_info()
        )
    text = formatter.format(record)
    lines = text.splitlines()
    assert "\n" not in lines[0] and lines[1] == "Traceback (most recent call last):" and len(lines) > 4
    assert not any(line.startswith("2025-01-01") for line in lines), text
    assert lines[-1] == "ValueError: bad id x\\n2025-01-01 00:00:00 ERROR reflectagent.judge: forged line"
