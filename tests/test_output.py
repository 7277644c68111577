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
    assert (
        "the 1 judgment(s) finished are in" in out.failure_note()
        and "is as it was before this run" in out.failure_note()
    )
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
    script = (
        "import sys; from reflectagent.output import AtomicOutput\n"
        "with AtomicOutput(sys.argv[1]) as out:\n    print('writing', flush=True); sys.stdin.readline()\n"
    )
    held = subprocess.Popen(
        [sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
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
    path.write_text(
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
            for i in range(n)
        )
    )
    return path


def judge(folder: Path, engine_url: str, data: Path, out: Path, *extra: str, wait: bool = True):
    config = folder / "c.toml"
    config.write_text(
        f'[backends.fake]\nmodel = "openai/fake"\napi_base = "{engine_url}/v1"\napi_key_env = "FAKE_KEY"\n'
        "constrained = false\nlogprobs = false\nnum_retries = 0\ntimeout_s = 30\n"
    )
    command = [
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
        str(folder / "cache"),
        "-o",
        str(out),
        "--concurrency",
        "1",
        *extra,
    ]
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "FAKE_KEY": "k"}
    )
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
        runs = [
            judge(tmp_path, engine.url, data, out, "--cache-dir", str(tmp_path / f"cache{i}"), wait=False)
            for i in range(2)
        ]
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


# ---- #32: a failed run never replaces an earlier one's partial; a kill keeps and reports; a full disk is told true ----


def test_a_second_failed_run_never_replaces_the_partial_an_earlier_one_kept(tmp_path):
    target = tmp_path / "out.jsonl"
    notes = []
    for run, lines in enumerate((900, 5, 2)):
        with pytest.raises(RuntimeError), AtomicOutput(target, report=notes.append) as out:
            for i in range(lines):
                out.write(f"run{run}-{i}")
            raise RuntimeError("the backend went away")
        note = out.failure_note()
        assert note.startswith(f"the {lines} judgment(s) finished are in {out.partial}")
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 900  # the first run's, as it was
    assert (tmp_path / "out.jsonl.partial.2").read_text() == "".join(f"run1-{i}\n" for i in range(5))
    assert out.partial == tmp_path / "out.jsonl.partial.3" and "earlier runs kept are left as they were" in note
    (tmp_path / "out.jsonl.partial").write_text("")  # an empty partial holds nothing to lose: it is used again
    with pytest.raises(RuntimeError), AtomicOutput(target, report=notes.append) as out:
        out.write("again")
        raise RuntimeError("stopped")
    assert out.partial == tmp_path / "out.jsonl.partial" and not target.exists()


def test_the_temporary_of_a_killed_run_is_kept_and_reported_by_the_next(tmp_path):
    import signal

    target = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text("earlier\n")
    script = (
        "import sys; from reflectagent.output import AtomicOutput\n"
        "with AtomicOutput(sys.argv[1]) as out:\n"
        "    out.write('one'); out.write('two'); print('written', flush=True); sys.stdin.readline()\n"
    )
    held = subprocess.Popen(
        [sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert held.stdout.readline().strip() == "written"
    held.send_signal(signal.SIGKILL)  # no handler, no __exit__: the lines are in its hidden temporary
    held.wait(30)
    hidden = tmp_path / f".out.jsonl.{held.pid}.tmp"
    assert hidden.read_text() == "one\ntwo\n"  # line-buffered: nothing was lost with the process
    (tmp_path / ".out.jsonl.1.tmp").write_text("")  # an empty one is only removed
    notes = []
    with AtomicOutput(target, report=notes.append) as out:
        out.write("three")
    assert notes == [
        (
            f"an earlier run writing {target} was killed before it ended: the 2 judgment line(s) it finished "
            f"are kept in {tmp_path / 'out.jsonl.partial.2'}"
        )
    ]
    assert (tmp_path / "out.jsonl.partial.2").read_text() == "one\ntwo\n" and target.read_text() == "three\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.jsonl",
        "out.jsonl.lock",
        "out.jsonl.partial",
        "out.jsonl.partial.2",
    ]


def test_a_full_disk_is_told_as_it_is_and_never_hides_the_lines(tmp_path, monkeypatch):
    """The flush or the rename failing: the error says where the lines really are, never masking the run's own."""
    import errno

    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    full_disk = (
        r"the finished run could not be written there \(No space left on device\): the 1 judgment\(s\) finished "
        r"are in .*out\.jsonl\.partial \(it could not be flushed to disk: No space left on device\); .* is as it was"
    )
    with pytest.raises(OutputError, match=full_disk), AtomicOutput(target) as out:
        out.write("one")
    assert target.read_text() == "old\n" and (tmp_path / "out.jsonl.partial").read_text() == "one\n"
    with (
        pytest.raises(RuntimeError, match="the backend went away"),
        AtomicOutput(target, report=lambda note: None) as out,
    ):
        out.write("two")
        raise RuntimeError("the backend went away")  # the run's own error, not the disk's
    assert (tmp_path / "out.jsonl.partial.2").read_text() == "two\n" and "flushed to disk" in out.failure_note()
    monkeypatch.setattr(os, "fsync", real_fsync)
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    out = AtomicOutput(target).__enter__()
    out.write("three")
    note = out.stop()  # the rename to .partial.3 fails: the note names the temporary the lines are in
    hidden = tmp_path / f".out.jsonl.{os.getpid()}.tmp"
    assert (
        note.startswith(f"the 1 judgment(s) finished are in {hidden} (they could not be moved to") and hidden.exists()
    )
    monkeypatch.setattr(os, "replace", real_replace)
    notes = []
    with AtomicOutput(target, report=notes.append) as out:  # the next run keeps them where they can be seen
        out.write("four")
    assert (tmp_path / "out.jsonl.partial.3").read_text() == "three\n" and "kept in" in notes[0]


def test_a_write_that_hits_a_full_disk_stops_the_run_with_the_whole_lines_kept(tmp_path):
    """A real short write (a file size limit stands in for a full disk): the run stops with an OutputError, the
    partial holds only whole lines, and the note says so."""
    script = (
        "import json, resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))\n"
        "from reflectagent.output import AtomicOutput, OutputError\n"
        "out = AtomicOutput(sys.argv[1], report=lambda note: None)\n"
        "try:\n"
        "    with out:\n"
        "        for i in range(100): out.write(json.dumps({'i': i, 'pad': 'x' * 80}))\n"
        "except OutputError as exc:\n"
        "    print(exc); print(out.failure_note())\n"
    )
    target = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    error, note = done.stdout.splitlines()
    assert error == f"-o {target}: a judgment could not be written (File too large)"
    kept = (tmp_path / "out.jsonl.partial").read_text().splitlines()
    assert len(kept) == 10 and [json.loads(line)["i"] for line in kept] == list(range(10))  # whole lines only
    assert note.startswith(f"the 10 judgment(s) finished are in {tmp_path / 'out.jsonl.partial'}")
    assert not list(tmp_path.glob(".*.tmp"))


def test_judge_stopped_by_sigterm_keeps_and_reports_its_judgments(tmp_path):
    import signal

    data = pairs_file(tmp_path, 30)
    out = tmp_path / "out.jsonl"
    engine = Engine("--delay", "0.3")
    try:
        run = judge(tmp_path, engine.url, data, out, wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until two judgments are in its (hidden) temporary
            hidden = list(tmp_path.glob(".out.jsonl.*.tmp"))
            if hidden and len(hidden[0].read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)  # `kill`, `timeout`
        _, stderr = run.communicate(timeout=120)
    finally:
        engine.stop()
    kept = (tmp_path / "out.jsonl.partial").read_text().splitlines()
    assert run.returncode == 143 and "Traceback" not in stderr, stderr
    assert (
        2 <= len(kept) < 30
        and f"stopped by SIGTERM after {len(kept)} of 30 judgments: the {len(kept)} judgment(s) "
        f"finished are in {tmp_path / 'out.jsonl.partial'}; {out} was not written."
        in stderr
    )
    assert [json.loads(line)["pair"]["id"] for line in kept] == [str(i) for i in range(len(kept))]
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
