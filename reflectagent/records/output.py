"""An output file that is either the whole of a finished run or left as it was: written beside its target, renamed
into place when the run ends, and locked against a second writer.

Why: opening the output for writing before judging starts erases it at once. ``-o`` naming the input erased the
input; a re-run that failed (the backend down) emptied the last good output; two runs writing the same ``-o``
interleaved their lines. Here the run writes (streams, as judgments finish) to a temporary file in the target's
folder; at the end :func:`os.replace` swaps it in whole (one rename, atomic on POSIX), and a run that fails keeps
what it finished as ``<target>.partial`` beside the old output, never over it. A lock file beside the target
(``<target>.lock``, via ``filelock``) makes a second writer fail at once, saying so; the lock goes with the
process, so a killed run leaves no stale lock behind.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TextIO

import filelock

from reflectagent.errors import ReflectAgentError

logger = logging.getLogger(__name__)


class OutputError(ReflectAgentError, ValueError):
    """An output path that cannot be written (a folder, a missing folder, one of the inputs), refused before any work."""


class OutputBusy(OutputError):
    """Another run holds the output's lock: two writers of one file would interleave their lines."""


def partial_path(target: Path) -> Path:
    """Where a failed run leaves the judgments it finished: beside the target, never over it."""
    return target.with_name(target.name + ".partial")


def free_partial(target: Path) -> Path:
    """The first of ``<target>.partial``, ``.partial.2``, ``.partial.3`` ... that holds nothing: a failed run never
    replaces the judgments an earlier one kept (run 1 kept 900 lines with ``--no-cache``, run 2 failed after 5)."""
    first = partial_path(target)
    for n in itertools.count(1):
        candidate = first if n == 1 else first.with_name(f"{first.name}.{n}")
        try:
            info = candidate.lstat()
        except FileNotFoundError:
            return candidate
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            return candidate
    raise AssertionError("unreachable")


def _whole_lines(path: Path) -> tuple[int, int]:
    """The lines a run finished writing in ``path`` (its newlines), and the bytes they take (the rest, if any, is
    a line cut off by a full disk or a kill)."""
    count = end = read = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk.rfind(b"\n")
            end = read + last + 1 if last >= 0 else end
            read += len(chunk)
    return count, end


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def is_stream(target: str | Path) -> bool:
    """Whether ``target`` is a pipe or a device (``-o /dev/stdout``, ``>(gzip > x)``): written as it comes, since
    it cannot be renamed onto or read back."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_output(target: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """The target, resolved (a symlink is written through to the file it names, as ``open`` would), or an
    :class:`OutputError` saying what to change: a folder, a folder that does not exist, or a path that is one of
    ``inputs`` (also through a symlink or a hard link), which writing would destroy. A pipe or device is
    returned as given."""
    given = Path(target)
    if is_stream(given):
        if any(_same_file(Path(source), given) for source in inputs):
            raise OutputError(f"-o {given} is the input {given}: name another output")
        return given
    path = given.resolve()
    if path.is_dir():
        raise OutputError(f"-o {given} is a folder: name a file in it (e.g. {given / 'judgments.jsonl'})")
    if not path.parent.is_dir():
        raise OutputError(f"-o {given}: the folder {path.parent} does not exist: create it first")
    for source in inputs:
        source = Path(source)
        if source.resolve() in (path, partial_path(path)) or _same_file(source, path):
            raise OutputError(
                f"-o {given} is the input file {source}: writing the judgments there would erase the "
                "pairs being judged. Name another output file"
            )
    return path


class AtomicOutput:
    """``with AtomicOutput(target, inputs) as out: out.write(line)``: lines go to a temporary file beside
    ``target`` as they come; leaving the block normally renames it onto ``target``, leaving it with an error keeps
    what was written as the first free :func:`free_partial` (``target`` untouched, an earlier partial too). Checked
    (:func:`check_output`) and locked on entry, before any work, so a second run writing the same file fails with
    :class:`OutputBusy`; on entry, the temporaries of runs that were killed (``kill -9``, a crash) are kept as
    partials too and reported to ``report``. A pipe or a device (``/dev/stdout``) is written as it comes: there is
    no file there to keep whole.

    :meth:`finish` and :meth:`stop` end the run explicitly (the block's end calls one of them if not): a caller that
    reports a failure calls :meth:`stop` first, so its message (:meth:`failure_note`) says what happened, not what
    was meant to (a full disk can fail the flush, and the rename can fail)."""

    def __init__(
        self, target: str | Path, inputs: Iterable[str | Path] = (), report: Callable[[str], None] | None = None
    ):
        self.given = Path(target)
        self.target = check_output(target, inputs)
        self.stream = is_stream(self.target)  # a pipe or device: written as it comes, nothing to rename or lock
        self.partial: Path | None = None  # where this run's lines were kept, once it stopped with some
        self.lines = 0  # lines given to write
        self.kept = 0  # whole lines in the kept file, once stopped
        self.problem: str | None = None  # what went wrong while keeping them (a full disk), once stopped
        self.report = report or (lambda note: logger.warning("%s", note))
        self._lock = filelock.FileLock(str(lock_path(self.target)), timeout=0)
        self._locked = False
        self._temporary: Path | None = None
        self._handle: TextIO | None = None
        self._ended: str | None = None  # "finished" or "stopped"
        self._guard = threading.Lock()  # a write from the event loop's thread against a stop from the main one

    def __enter__(self) -> AtomicOutput:
        if self.stream:
            try:
                self._handle = open(self.target, "w", encoding="utf-8", buffering=1)  # each line as it comes
            except OSError as exc:
                raise OutputError(f"-o {self.given}: cannot write to it ({exc.strerror})") from None
            return self
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise OutputBusy(
                f"another run is writing {self.given} (it holds {lock_path(self.target)}): wait for it to "
                "finish, or name another output file"
            ) from None
        except OSError as exc:
            raise OutputError(f"-o {self.given}: cannot write in {self.target.parent} ({exc.strerror})") from None
        self._locked = True
        try:
            self._keep_leftovers()  # under the lock: every temporary left is a dead run's, ours included (a reused pid)
            self._temporary = self._temporary_name(os.getpid())
            # O_EXCL: never through a file or link someone planted there; mode 0o666 under the umask, as open() makes it
            fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            self._release()
            raise OutputError(f"-o {self.given}: cannot write in {self.target.parent} ({exc.strerror})") from None
        # line-buffered: each finished line is in the file at once, so a run killed outright (kill -9) loses none
        self._handle = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        return self

    def _temporary_name(self, pid: int) -> Path:
        return self.target.with_name(f".{self.target.name}.{pid}.tmp")

    def _keep_leftovers(self) -> None:
        """The temporaries of earlier runs of this target that were killed: a file with lines is kept as a partial
        and reported, an empty one removed, anything else (a link) reported and left."""
        pattern = re.compile(re.escape(f".{self.target.name}.") + r"[0-9]+\.tmp")
        for name in sorted(os.listdir(self.target.parent)):
            if not pattern.fullmatch(name):
                continue
            leftover = self.target.parent / name
            info = leftover.lstat()
            if not stat.S_ISREG(info.st_mode):
                self.report(
                    f"{leftover} is left from an earlier run of -o {self.given} but is not a file: "
                    "look at it, then remove it"
                )
            elif info.st_size == 0:
                leftover.unlink()
            else:
                lines, _ = _whole_lines(leftover)
                kept = free_partial(self.target)
                os.replace(leftover, kept)
                self.report(
                    f"an earlier run writing {self.given} was killed before it ended: the {lines} judgment "
                    f"line(s) it finished are kept in {kept}"
                )

    def write(self, line: str) -> None:
        """One line (its newline added), written now: a run that stops keeps it in the partial file. A run that
        was stopped or finished takes no more (:class:`OutputError`)."""
        with self._guard:
            if self._handle is None or self._ended:
                raise OutputError(f"-o {self.given}: the output was {self._ended or 'not opened'}; no more lines")
            try:
                self._handle.write(line + "\n")
            except OSError as exc:  # a full disk: the run stops here, as when the backend goes away, and keeps the rest
                raise OutputError(f"-o {self.given}: a judgment could not be written ({exc.strerror or exc})") from None
            self.lines += 1

    def finish(self) -> None:
        """The run is whole: its file renamed onto the target (keeping the target's permissions). If that cannot
        be done (a full disk fails the flush, the rename fails), the lines are kept as :meth:`stop` keeps them and an
        :class:`OutputError` says where they are."""
        with self._guard:
            if self._ended:
                return
            if self.stream:
                self._ended = "finished"
                self._close_quietly()
                if self.problem:  # a pipe whose reader went away
                    raise OutputError(f"-o {self.given}: {self.problem}")
                return
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())  # on disk before the rename makes it the output
                self._handle.close()
                if self.target.exists():
                    shutil.copymode(self.target, self._temporary)  # the output keeps the permissions it had
                os.replace(self._temporary, self.target)
            except OSError as exc:
                failed = f"{exc.strerror or exc}"
            else:
                self._ended = "finished"
                self._release()
                return
        self.stop()
        raise OutputError(
            f"-o {self.given}: the finished run could not be written there ({failed}): {self.failure_note()}"
        )

    def stop(self) -> str:
        """The run failed: what it wrote is kept as the first free :func:`free_partial` (or, if that rename fails,
        where it is), the target left as it was. Never raises for the file's sake (the run's own error is the one
        to report); returns :meth:`failure_note`, which is then true."""
        with self._guard:
            if self._ended is None:
                self._ended = "stopped"
                if self.stream:
                    self._close_quietly()
                else:
                    self._keep()
                    self._release()
        return self.failure_note()

    def _close_quietly(self) -> None:
        try:
            self._handle.close()
        except OSError as exc:  # the last lines did not reach it
            self.problem = self.problem or f"the last lines could not be written: {exc.strerror or exc}"

    def _keep(self) -> None:
        if not self._handle.closed:
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except OSError as exc:  # a full disk: what reached the file is kept, and the message says what did not
                self.problem = f"it could not be flushed to disk: {exc.strerror or exc}"
            self._close_quietly()
        try:
            self.kept, end = _whole_lines(self._temporary)
            if end < self._temporary.stat().st_size:  # a line the disk cut off: not a judgment, and not JSON
                os.truncate(self._temporary, end)
            if end == 0:
                self._temporary.unlink()
                return
            kept = free_partial(self.target)
            os.replace(self._temporary, kept)
            self.partial = kept
        except OSError as exc:  # the lines stay in the temporary: the note names it, and the next run keeps it
            self.partial = self._temporary if self._temporary.exists() else None
            self.problem = (
                self.problem + "; " if self.problem else ""
            ) + f"they could not be moved to {partial_path(self.target)} ({exc.strerror or exc})"

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self._lock.release()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._ended is not None or self._handle is None:
            self._release()
            return
        if kind is None:
            self.finish()
            return
        self.stop()
        if not self.stream and (self.partial or self.problem):
            self.report(f"the run stopped: {self.failure_note()}")

    def failure_note(self) -> str:
        """What a failed run left, for its error message: where the finished lines are, and that the output is as
        it was. Stops the run first if it was not (so the note is what happened)."""
        if self._ended is None and self._handle is not None:
            self.stop()
        if self.stream:
            note = f"the {self.lines} judgment(s) finished were written to {self.given} as they came"
            return note + (f" ({self.problem})." if self.problem else ".")
        if self.partial:
            kept = f"the {self.kept} judgment(s) finished are in {self.partial}"
            if self.partial.name.startswith(f"{partial_path(self.target).name}."):
                kept += (
                    f" (not {partial_path(self.target).name}: the judgments earlier runs kept are left as they were)"
                )
        else:
            kept = "no judgment was finished" if not self.lines else "no finished judgment could be kept"
        if self.problem:
            kept += f" ({self.problem}"
            kept += f"; {self.lines - self.kept} of the {self.lines} are not in it)" if self.kept < self.lines else ")"
        before = (
            f"{self.given} is as it was before this run" if self.target.exists() else f"{self.given} was not written"
        )
        return f"{kept}; {before}."
