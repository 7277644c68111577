"""The hostile lines of the bad-input table (nested 200,000 deep, a 5,000-digit number, a category that is an
object, a source that is a list) through every reader that is not ``judge`` (which the table runs): ``eval``,
``finetune data`` (pairs and a teacher file) and the teacher reader. Each is a skipped line with its number and
reason; the good lines are used. And the bounds every reader shares (``reflectagent.reading``)."""

from __future__ import annotations

import gzip
import json
import os
import threading

import pytest
from fakes import Engine
from typer.testing import CliRunner

from reflectagent.cli import app
from reflectagent.pairs import read_pairs
from reflectagent.reading import PairFileError, ReadLimits
from reflectagent.teacher import read_teacher

GOOD = {
    "prompt": "What is the capital of France?",
    "response_a": "Paris, right.",
    "response_b": "Berlin, wrong.",
    "label": "A",
    "teacher_analysis": "Response A is right.",
    "teacher_preference": "A",
}
HOSTILE = {  # line number (after one good line) -> the reason it must be skipped with
    2: ("[" * 200_000 + "]" * 200_000, "nested too deep to read"),
    3: (
        '{"prompt": "p", "response_a": "a", "response_b": "b", "x": %s}' % ("[" * 200_000 + "]" * 200_000),
        "nested too deep to read",
    ),
    4: (
        '{"id": %s, "prompt": "p", "response_a": "a", "response_b": "b"}' % ("7" * 5000),
        "a number of more than 4300 digits",
    ),
    5: (json.dumps({**GOOD, "category": {"x": 1}}), "category must be text, got dict"),
    6: (json.dumps({**GOOD, "source": ["a", "b"]}), "source must be text, got list"),
}


def hostile_file(tmp_path, name="pairs.jsonl", goods: int = 1):
    lines = [json.dumps({**GOOD, "id": f"good{i}"}) for i in range(goods)]
    path = tmp_path / name
    path.write_text("\n".join([lines[0], *(text for text, _ in HOSTILE.values()), *lines[1:]]) + "\n")
    return path


def expected(path) -> list[str]:
    return [f"{path}:{number}: " for number in HOSTILE]


def assert_reported(bad, path):
    assert [(b.line, HOSTILE[b.line][1] in b.error) for b in bad] == [(number, True) for number in HOSTILE], bad


def test_the_pair_and_teacher_readers_skip_each_hostile_line_with_its_reason(tmp_path):
    path = hostile_file(tmp_path, goods=2)
    pairs, bad = read_pairs(path)
    assert [p.id for p in pairs] == ["good0", "good1"]
    assert_reported(bad, path)
    judgments, bad = read_teacher(path)
    assert [j.pair.id for j in judgments] == ["good0", "good1"]
    assert_reported(bad, path)


def test_a_teacher_line_with_a_hostile_teacher_field_is_skipped(tmp_path):
    path = tmp_path / "teacher.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                GOOD,
                {**GOOD, "teacher": {"name": "x"}},
                {**GOOD, "prompt_also_in": [["nested"]]},
                {**GOOD, "prompt_also_in": 3},
                {**GOOD, "teacher_preference": ["A"]},
            ]
        )
        + "\n"
    )
    judgments, bad = read_teacher(path)
    assert len(judgments) == 1 and [b.line for b in bad] == [2, 3, 4, 5]
    assert "teacher must be text" in bad[0].error and "prompt_also_in must be a list" in bad[1].error
    assert "got list" in bad[3].error


@pytest.fixture(scope="module")
def engine():
    fake = Engine()
    yield fake
    fake.stop()


def config_file(tmp_path, engine) -> str:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[backends.fake]\nmodel = "openai/fake"\napi_base = "{engine.url}/v1"\napi_key_env = "FAKE_KEY"\n'
        "constrained = false\nlogprobs = false\nnum_retries = 0\ncontext_chars = 4000\n"
    )
    return str(config)


def test_eval_skips_each_hostile_line_and_judges_the_rest(tmp_path, engine, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")
    path = hostile_file(tmp_path, goods=2)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data",
            str(path),
            "--programs",
            "genrm",
            "--backends",
            "fake",
            "--config",
            config_file(tmp_path, engine),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-o",
            str(tmp_path / "report"),
        ],
    )
    output = result.stdout + result.stderr
    assert result.exit_code == 0 and "Traceback" not in output, output
    for line in expected(path):
        assert f"skipped {line}" in output
    assert json.loads((tmp_path / "report" / "report.json").read_text())["meta"]["pairs"] == 2


@pytest.mark.parametrize("source", ["--data", "--teacher-file"])
def test_finetune_data_skips_each_hostile_line_and_builds_from_the_rest(tmp_path, engine, monkeypatch, source):
    monkeypatch.setenv("FAKE_KEY", "k")
    path = hostile_file(tmp_path, goods=10)
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "data",
            source,
            str(path),
            "--kind",
            "verdict",
            "--backend",
            "fake",
            "--config",
            config_file(tmp_path, engine),
            "-o",
            str(tmp_path / "data"),
            "--fractions",
            "1,0,0",
        ],
    )
    output = result.stdout + result.stderr
    assert result.exit_code == 0 and "Traceback" not in output, output
    for line in expected(path):
        assert f"skipped {line}" in output
    card = json.loads((tmp_path / "data" / "data_card.json").read_text())
    assert sum(card["pairs"].values()) == 10


def test_every_reader_refuses_a_device_and_reads_a_pipe_within_the_same_bounds(tmp_path):
    device = tmp_path / "pairs.jsonl"
    device.symlink_to("/dev/zero")
    for read in (read_pairs, read_teacher):
        with pytest.raises(PairFileError, match="is a device"):
            read(device)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text((json.dumps(GOOD) + "\n") * 50))
    writer.start()
    with pytest.raises(PairFileError, match=r"holds more than 1,000 bytes .*reading\.max_input_bytes"):
        read_pairs(fifo, ReadLimits(max_input_bytes=1000))
    writer.join(10)


def test_the_line_and_size_bounds_hold_for_gzip_and_utf16(tmp_path):
    limits = ReadLimits(max_line_bytes=1000, max_input_bytes=10_000)
    long_line = tmp_path / "long.jsonl.gz"
    long_line.write_bytes(gzip.compress(json.dumps({**GOOD, "prompt": "x" * 2000}).encode() + b"\n"))
    with pytest.raises(
        PairFileError, match=r"long\.jsonl\.gz:1: a line longer than 1,000 bytes \(reading\.max_line_bytes\)"
    ):
        read_pairs(long_line, limits)
    inflated = tmp_path / "many.jsonl.gz"
    inflated.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode() * 100))
    with pytest.raises(PairFileError, match="holds more than 10,000 bytes"):
        read_pairs(inflated, limits)
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_text((json.dumps(GOOD) + "\n") * 20, encoding="utf-16")
    with pytest.raises(PairFileError, match="UTF-16 file longer than 1,000 bytes"):
        read_pairs(utf16, limits)
    exact = tmp_path / "exact.jsonl"  # a line of exactly the limit (its newline not counted) is read
    line = json.dumps({**GOOD, "prompt": ""})
    line = json.dumps({**GOOD, "prompt": "p" * (1000 - len(line))})
    exact.write_text(line + "\n")
    assert len(line) == 1000 and len(read_pairs(exact, limits)[0]) == 1


def test_the_reading_bounds_are_settings(tmp_path):
    from reflectagent.config import ConfigError, load_settings

    config = tmp_path / "c.toml"
    config.write_text("[reading]\nmax_line_bytes = 4096\n")
    assert load_settings(config).reading == ReadLimits(max_line_bytes=4096)
    config.write_text("[reading]\nmax_line_bytes = 0\n")
    with pytest.raises(ConfigError, match="reading.max_line_bytes: Input should be greater than 0"):
        load_settings(config)


def test_a_stream_of_garbage_stops_at_max_bad_lines_with_the_list_bounded(tmp_path):
    """``cat /dev/urandom | reflectagent judge /dev/stdin``: a pipe is read, but random bytes are a bad line every few
    hundred bytes; the reader stops at max_bad_lines instead of listing them until max_input_bytes."""
    fifo = tmp_path / "urandom.jsonl"
    os.mkfifo(fifo)
    stop = threading.Event()

    def write_garbage():
        try:
            with open(fifo, "wb") as pipe:
                while not stop.is_set():
                    pipe.write(os.urandom(1 << 16))
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=write_garbage)
    writer.start()
    try:
        with pytest.raises(PairFileError, match=r"more than 1,000 bad lines \(reading\.max_bad_lines; line \d+: "):
            read_pairs(fifo, ReadLimits(max_bad_lines=1000))
    finally:
        stop.set()
        writer.join(10)
    good_then_bad = tmp_path / "mixed.jsonl"
    good_then_bad.write_text(json.dumps(GOOD) + "\n" + "not json\n" * 3)
    pairs, bad = read_pairs(good_then_bad, ReadLimits(max_bad_lines=3))  # at the limit: read, every bad line listed
    assert len(pairs) == 1 and len(bad) == 3


def test_a_file_that_starts_like_an_array_is_held_only_up_to_max_line_bytes(tmp_path):
    """A JSON Lines file whose first (bad) line starts with ``[``: tried as one array for at most max_line_bytes, then
    read line by line as it comes (a pipe gives its first pair before the writer has finished), never held whole."""
    from reflectagent.pairs import iter_pairs

    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    released = threading.Event()
    waited: list[bool] = []
    line = (json.dumps(GOOD) + "\n").encode()

    def write():
        with open(fifo, "wb") as pipe:
            pipe.write(b"[1]\n" + line * 20)  # ~3.5 KB: past the 1,000 bytes an array may take
            pipe.flush()
            waited.append(released.wait(15))  # the reader has a pair before the rest of the file exists
            pipe.write(line * 5)

    writer = threading.Thread(target=write)
    writer.start()
    bad = []
    pairs = iter_pairs(fifo, bad, ReadLimits(max_line_bytes=1000))
    first = next(pairs)
    released.set()
    rest = list(pairs)
    writer.join(20)
    assert waited == [True] and first.prompt == GOOD["prompt"] and len(rest) == 24
    assert [(b.line, b.error) for b in bad] == [(1, "expected a JSON object, got list")]


def test_a_damaged_or_cut_gzip_is_an_error_naming_the_file_not_a_traceback(tmp_path):
    packed = bytearray(gzip.compress((json.dumps(GOOD) + "\n").encode() * 200, mtime=0))
    damaged, cut = tmp_path / "damaged.jsonl.gz", tmp_path / "cut.jsonl.gz"
    damaged.write_bytes(bytes(packed[:40]) + bytes(b ^ 0xFF for b in packed[40:60]) + bytes(packed[60:]))
    cut.write_bytes(bytes(packed[: len(packed) // 2]))
    for path, reason in ((damaged, "Error -3 while decompressing"), (cut, "Compressed file ended before")):
        for read in (read_pairs, read_teacher):
            with pytest.raises(PairFileError, match=rf"{path.name} is not a readable gzip file \({reason}.*gzip -t"):
                read(path)
