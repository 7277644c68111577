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

import logging
import os
import shutil
import stat
from collections.abc import Iterable
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
            raise OutputError(f"-o {given} is the input file {source}: writing the judgments there would erase the "
                              "pairs being judged. Name another output file")
    return path


class AtomicOutput:
    """``with AtomicOutput(target, inputs) as out: out.write(line)``: lines go to a temporary file beside
    ``target`` as they come; leaving the block normally renames it onto ``target``, leaving it with an error keeps
    what was written as :func:`partial_path` (``target`` untouched). Checked (:func:`check_output`) and locked on
    entry, before any work, so a second run writing the same file fails with :class:`OutputBusy`. A pipe or a
    device (``/dev/stdout``) is written as it comes: there is no file there to keep whole."""

    def __init__(self, target: str | Path, inputs: Iterable[str | Path] = ()):
        self.given = Path(target)
        self.target = check_output(target, inputs)
        self.stream = is_stream(self.target)  # a pipe or device: written as it comes, nothing to rename or lock
        self.partial = partial_path(self.target)
        self.lines = 0
        self._lock = filelock.FileLock(str(lock_path(self.target)), timeout=0)
        self._temporary: Path | None = None
        self._handle: TextIO | None = None

    def __enter__(self) -> AtomicOutput:
        if self.stream:
            try:
                self._handle = open(self.target, "w", encoding="utf-8")
            except OSError as exc:
                raise OutputError(f"-o {self.given}: cannot write to it ({exc.strerror})") from None
            return self
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise OutputBusy(f"another run is writing {self.given} (it holds {lock_path(self.target)}): wait for it to "
                             "finish, or name another output file") from None
        except OSError as exc:
            raise OutputError(f"-o {self.given}: cannot write in {self.target.parent} ({exc.strerror})") from None
        try:
            self._temporary = self.target.with_name(f".{self.target.name}.{os.getpid()}.tmp")
            # O_EXCL: never through a file or link someone planted there; mode 0o666 under the umask, as open() makes it
            fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # our pid's leftover from a run that was killed: ours to replace, under the lock
            self._temporary.unlink()
            fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            self._lock.release()
            raise OutputError(f"-o {self.given}: cannot write in {self.target.parent} ({exc.strerror})") from None
        self._handle = os.fdopen(fd, "w", encoding="utf-8")
        return self

    def write(self, line: str) -> None:
        """One line (its newline added), written now: a run that stops keeps it in the partial file."""
        self._handle.write(line + "\n")
        self.lines += 1

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.stream:
            self._handle.close()
            return
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())  # on disk before the rename makes it the output
            self._handle.close()
            if kind is None:
                if self.target.exists():
                    shutil.copymode(self.target, self._temporary)  # the output keeps the permissions it had
                os.replace(self._temporary, self.target)
            elif self.lines:
                os.replace(self._temporary, self.partial)
                logger.info("the run stopped: %d finished line(s) kept in %s", self.lines, self.partial)
            else:
                self._temporary.unlink()
        finally:
            self._lock.release()

    def failure_note(self) -> str:
        """What a failed run left, for its error message: where the finished lines are, and that the output is as it was."""
        if self.stream:
            return f"the {self.lines} judgment(s) finished were written to {self.given} as they came."
        kept = (f"the {self.lines} judgment(s) finished are in {self.partial}" if self.lines else "no judgment was finished")
        before = f"{self.given} is as it was before this run" if self.target.exists() else f"{self.given} was not written"
        return f"{kept}; {before}."
