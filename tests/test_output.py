"""``judge -o`` loses nothing: the output is renamed into place whole when a run ends, a failed run keeps its finished
judgments beside the old output (never over it), the input is never the output, and two writers cannot interleave.
The three data-loss cases run the real command as separate processes, as a user runs it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import Engine

from reflectagent.output import AtomicOutput, OutputBusy, OutputError


def test_a_finished_run_replaces_the_output_whole_keeping_its_permissions(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    target.chmod(0o640)
    with AtomicOutput(target) as out:
        out.write("one")
        assert target.read_text() == "old\n"  # streamed beside it, not over it
        out.write("two")
    assert target.read_text() == "one\ntwo\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.lock"]  # no temporary left


def test_a_failed_run_keeps_what_it_wrote_beside_the_old_output(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), AtomicOutput(target) as out:
        out.write("finished")
        raise RuntimeError("the backend went away")
    assert target.read_text() == "old\n" and (tmp_path / "out.jsonl.partial").read_text() == "finished\n"
    assert "the 1 judgment(s) finished are in" in out.failure_note() and "is as it was before this run" in out.failure_note()
    with pytest.raises(RuntimeError), AtomicOutput(tmp_path / "new.jsonl") as empty:
        raise RuntimeError("before any judgment")
    assert not (tmp_path / "new.jsonl").exists() and not (tmp_path / "new.jsonl.partial").exists()
    assert empty.failure_note() == f"no judgment was finished; {tmp_path / 'new.jsonl'} was not written."


def test_an_output_that_is_an_input_a_folder_or_nowhere_is_refused(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("x\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    for alias in (data, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", tmp_path / "." / "pairs.jsonl"):
        with pytest.raises(OutputError, match="is the input file"):
            AtomicOutput(alias, [data])
    with pytest.raises(OutputError, match="is a folder"):
        AtomicOutput(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        AtomicOutput(tmp_path / "nope" / "out.jsonl")
    assert data.read_text() == "x\n"


def test_a_second_writer_of_the_same_output_fails_at_once(tmp_path):
    target = tmp_path / "out.jsonl"
    script = ("import sys; from reflectagent.output import AtomicOutput\n"
              "with AtomicOutput(sys.argv[1]) as out:\n    print('writing', flush=True); sys.stdin.readline()\n")
    held = subprocess.Popen([sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "writing"
        with pytest.raises(OutputBusy, match="another run is writing"):
            AtomicOutput(target).__enter__()
    finally:
        held.communicate("\n", timeout=30)
    with AtomicOutput(target) as out:  # its lock went with it
        out.write("mine")
    assert target.read_text() == "mine\n"


# ---- the real command, as separate processes ------------------------------------------------------------

def pairs_file(folder: Path, n: int) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "prompt": f"question {i}", "response_a": f"right {i}",
                                        "response_b": f"wrong {i}", "label": "A"}) + "\n" for i in range(n)))
    return path


def judge(folder: Path, engine_url: str, data: Path, out: Path, *extra: str, wait: bool = True):
    config = folder / "c.toml"
    config.write_text(f'[backends.fake]\nmodel = "openai/fake"\napi_base = "{engine_url}/v1"\napi_key_env = "FAKE_KEY"\n'
                      'constrained = false\nlogprobs = false\nnum_retries = 0\ntimeout_s = 30\n')
    command = [sys.executable, "-m", "reflectagent.cli", "judge", str(data), "--program", "genrm", "--backend", "fake",
               "--config", str(config), "--cache-dir", str(folder / "cache"), "-o", str(out), "--concurrency", "1", *extra]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "FAKE_KEY": "k"})
    if not wait:
        return run
    stdout, stderr = run.communicate(timeout=300)
    return run.returncode, stdout, stderr


def test_the_input_named_as_the_output_survives(tmp_path):
    engine = Engine()
    try:
        data = pairs_file(tmp_path, 3)
        before = data.read_bytes()
        code, _, stderr = judge(tmp_path, engine.url, data, tmp_path / "." / "pairs.jsonl")
        assert code == 2 and "is the input file" in stderr and "Traceback" not in stderr
        assert data.read_bytes() == before and engine.count() == 0  # refused before anything was judged
    finally:
        engine.stop()


def test_the_previous_output_survives_a_failed_rerun(tmp_path):
    data = pairs_file(tmp_path, 4)
    out = tmp_path / "out.jsonl"
    engine = Engine()
    try:
        assert judge(tmp_path, engine.url, data, out)[0] == 0
    finally:
        engine.stop()
    good = out.read_bytes()
    assert len(good.splitlines()) == 4
    dying = Engine("--die-after", "2")  # new pairs (so not cached): two are judged, then the backend dies
    try:
        (tmp_path / "more").mkdir()
        more = pairs_file(tmp_path / "more", 4)
        more.write_text(more.read_text().replace("question", "another question"))
        code, _, stderr = judge(tmp_path, dying.url, more, out)
    finally:
        dying.stop()
    assert code == 1 and "stopped after 2 of 4 judgments" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == good  # the last good output, as it was
    assert "the 2 judgment(s) finished are in" in stderr and f"{out} is as it was before this run" in stderr
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl.partial").read_text().splitlines()]
    assert [k["pair"]["prompt"] for k in kept] == ["another question 0", "another question 1"]
    assert "run the same command again to resume" in stderr  # the cache is on: true


def test_two_writers_of_one_output_cannot_interleave(tmp_path):
    data = pairs_file(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    engine = Engine("--delay", "1.5")  # whichever run takes the lock is still judging (9 s) when the other reaches it
    try:
        runs = [judge(tmp_path, engine.url, data, out, "--cache-dir", str(tmp_path / f"cache{i}"), wait=False) for i in range(2)]
        results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    finally:
        engine.stop()
    assert sorted(code for code, _, _ in results) == [0, 2], results
    _, _, refused = next(r for r in results if r[0] == 2)
    assert "another run is writing" in refused and "Traceback" not in refused
    written = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole, each pair once
    assert [w["pair"]["id"] for w in written] == [str(i) for i in range(6)]
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_a_pipe_or_device_as_the_output_is_written_as_it_comes(tmp_path):
    import threading

    fifo = tmp_path / "out.pipe"
    os.mkfifo(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()))
    reader.start()
    with AtomicOutput(fifo) as out:
        out.write("one")
    reader.join(10)
    assert read == ["one\n"] and sorted(p.name for p in tmp_path.iterdir()) == ["out.pipe"]  # no lock, no temporary
    with pytest.raises(RuntimeError), AtomicOutput("/dev/null") as null:
        null.write("x")
        raise RuntimeError("stopped")
    assert null.failure_note() == "the 1 judgment(s) finished were written to /dev/null as they came."
