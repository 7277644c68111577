"""Real faults from a real misbehaving server (``bench/fake_engine.py`` on loopback), through the
``reflectagent judge`` command as a user runs it: each fault is retried with backoff and either the
run completes or it stops cleanly, saying whether a re-run resumes; never a guessed verdict, and a
re-run loses nothing that was finished."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import Engine

RESUME = "run the same command again to resume"
PAIRS = 4  # one order each (genrm): one LM call a pair


@pytest.fixture
def run(tmp_path):
    engines = []

    def judge(
        engine: Engine, retries: int = 2, timeout_s: float = 5, pairs: int = PAIRS, cache_dir: Path | None = None
    ):
        engines.append(engine)
        data = tmp_path / "pairs.jsonl"
        data.write_text(
            "".join(
                json.dumps(
                    {
                        "id": str(i),
                        "prompt": f"question {i}",
                        "response_a": f"right {i}",
                        "response_b": f"wrong {i}",
                        "label": "A",
                    }
                )
                + "\n"
                for i in range(pairs)
            )
        )
        config = tmp_path / "c.toml"
        config.write_text(
            f'[backends.fake]\nmodel = "openai/fake"\napi_base = "{engine.url}/v1"\napi_key_env = "FAKE_KEY"\n'
            f"constrained = false\nlogprobs = false\nnum_retries = {retries}\ntimeout_s = {timeout_s}\n"
            "context_chars = 4000\n"
        )
        out = tmp_path / "out.jsonl"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "reflectagent.cli",
                "judge",
                str(data),
                "--program",
                "genrm",
                "--backend",
                "fake",
                "--config",
                str(config),
                "--cache-dir",
                str(cache_dir or tmp_path / "cache"),
                "--output",
                str(out),
                "--concurrency",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "FAKE_KEY": "k"},
        )
        judged = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        return result, judged

    yield judge
    for engine in engines:
        engine.stop()


@pytest.mark.parametrize("fault", ["500", "503", "reset", "truncated"])
def test_a_passing_fault_is_retried_and_the_run_completes(run, fault):
    engine = Engine("--fault", fault, "--fail-first", "2")
    result, judged = run(engine)
    assert result.returncode == 0, result.stderr
    assert [j["judgment"]["preference"] for j in judged] == ["A"] * PAIRS
    assert engine.count() == PAIRS + 2  # the two failures were retried, nothing else was asked twice


@pytest.mark.parametrize(
    "fault, shown",
    [
        ("500", "LMServerError"),
        ("503", "LMServerError"),
        ("reset", "Connection reset by peer"),
        ("truncated", "body bytes outstanding"),
        ("hang", "timed out"),
        ("malformed", "is not JSON"),
    ],
)
def test_a_lasting_fault_stops_the_run_cleanly_and_says_a_rerun_resumes(run, fault, shown):
    engine = Engine("--fault", fault)
    result, judged = run(engine, retries=1, timeout_s=1, pairs=1)
    assert result.returncode == 1 and "stopped after 0 of 1 judgments" in result.stderr and shown in result.stderr
    assert RESUME in result.stderr and "Traceback" not in result.stderr
    assert judged == []  # no verdict was made up for a pair that could not be judged
    # DSPy retries what can be retried (1 retry here, with backoff); a 200 with a broken body may have been
    # served, so DSPy sends it once.
    assert engine.count() == (1 if fault == "malformed" else 2)


def test_a_server_that_dies_midway_stops_the_run_and_a_rerun_on_its_return_loses_nothing(run):
    engine = Engine("--die-after", "2")
    result, judged = run(engine, retries=0)
    assert result.returncode == 1 and "stopped after 2 of 4 judgments" in result.stderr and RESUME in result.stderr
    assert engine.process.wait(timeout=10) == 0  # it really died
    back = Engine(port=engine.port)
    result, judged = run(back)
    assert result.returncode == 0, result.stderr
    assert [j["judgment"]["preference"] for j in judged] == ["A"] * PAIRS
    assert back.count() == 2  # only the two pairs that were not finished


def test_a_server_that_comes_back_within_the_retries_is_not_noticed(run, tmp_path):
    engine = Engine("--die-after", "2")
    port = engine.port

    def restart_when_dead():
        engine.process.wait(timeout=60)
        time.sleep(1.5)  # the first retries find nobody there
        return Engine(port=port)

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        revived = pool.submit(restart_when_dead)
        result, judged = run(engine, retries=4)  # backoff 1 + 2 + 4 + 8 s: room for the return
        back = revived.result()
    try:
        assert result.returncode == 0, result.stderr
        assert [j["judgment"]["preference"] for j in judged] == ["A"] * PAIRS
        assert back.count() == 2
    finally:
        back.stop()


@pytest.fixture
def mounted(tmp_path):
    """A small tmpfs of our own (``mount`` needs root: skipped elsewhere), unmounted afterwards."""
    mounts = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mount{len(mounts)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("case", ["a file", "read-only", "full"])
def test_a_cache_that_cannot_keep_steps_is_an_error_at_start_before_any_call(run, mounted, tmp_path, case):
    if case == "a file":
        folder = tmp_path / "not-a-folder"
        folder.write_text("x")
    elif case == "read-only":
        folder = mounted("ro,size=1m") / "cache"
    else:
        folder = mounted("size=2m") / "cache"
    engine = Engine()
    result, judged = run(engine, cache_dir=folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    expected = "KiB free, less than 16 MiB" if case == "full" else "cannot be written"
    assert f"the judgment cache folder {folder}" in result.stderr and expected in result.stderr
    assert "--cache-dir" in result.stderr and RESUME not in result.stderr
    assert engine.count() == 0 and judged == []
