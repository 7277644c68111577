"""A prepared model folder's record and its name: what it was made from, and what judgments made by it are keyed on.

Every folder reflectagent makes (a converted GGUF, a preset, a merged adapter) lands whole (:func:`landing`), with
a record of its source (``SOURCE_FILE``) and a done marker written last (``DONE_MARKER``). The record says how the
folder is served where nothing else does (its context, :func:`default_context`) and names it for the judgment
cache (:func:`model_identity`); a folder without one is named by its contents (:func:`fingerprint`). Below every
other module of :mod:`reflectagent.serving`, so presets, models and backends read one definition of each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

DONE_MARKER = ".reflectagent-complete"
SOURCE_FILE = "reflectagent-source.json"  # where a converted folder says what it was made from
# What a server is started with where neither the caller nor the folder's preset says (default_context, default_dtype)
DEFAULT_CONTEXT = 2048  # the embedded SmolLM2's serving length (its judge prompts fit with room to spare)
DEFAULT_DTYPE = "bfloat16"


def is_prepared(folder: Path) -> bool:
    return (folder / DONE_MARKER).exists()


@contextlib.contextmanager
def landing(out: Path, made_from: str, source: dict | None = None):
    """A ``.partial`` folder to write a model into; on success ``source`` and the done marker are added
    and it replaces ``out`` in one rename, so a crash never leaves a half folder in place."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        if source is not None:
            (partial / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        (partial / DONE_MARKER).write_text(made_from + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def read_source(folder: str | Path) -> dict:
    """What a prepared folder says it was made from (``SOURCE_FILE``); {} where it says nothing readable."""
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def default_context(folder: str | Path) -> int:
    """The context length to serve a prepared folder with: its preset's, else ``DEFAULT_CONTEXT``."""
    return int(read_source(folder).get("max_model_len") or DEFAULT_CONTEXT)


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def fingerprint(folder: str | Path) -> str:
    """Identity of a model folder: every file's name and full contents (memoised by size and mtime).

    Hashing only the head of the weights is not enough: two models fine-tuned from one base
    share their size and their first megabyte (the header and the untouched embeddings), and
    their judgments would be served from one another's cache.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(_file_digest(path).encode())
    return digest.hexdigest()[:16]


def model_identity(folder: str | Path) -> str:
    """What judgments made by a model folder are keyed on: its pinned inputs where it has them, else its contents.

    A folder whose source record carries pins (written by ``models prepare`` for a preset's verified
    GGUF, and for a tuned preset its adapter too; ``bench/verdict_distill.py`` writes the same for its
    merge) is named by them. Its bytes would be the wrong name: they also hold that record, which gains
    fields as the code grows, and the version of transformers that wrote ``config.json``. Either changes
    the bytes, not the model, and a cache made on one machine then missed on the next (every committed
    bench cache did once). Hashing 3.5 to 7 GB also cost seconds at every start.

    The pins are trusted only while the folder is as it was made: no file in it newer than its done
    marker, written last. Weights saved into a prepared folder afterwards make it an unpinned folder
    again. Any other folder (no pin, a fine-tuned model, a merge without a record) is named by
    :func:`fingerprint`. The recipe (a GGUF converted in bfloat16, an adapter merged in float32) is
    this code's: a change to it must change these names.
    """
    folder = Path(folder)
    marker = folder / DONE_MARKER
    if not marker.is_file():
        return fingerprint(folder)
    made = marker.stat().st_mtime_ns
    if any(path.stat().st_mtime_ns > made for path in folder.rglob("*") if path.is_file()):
        return fingerprint(folder)  # changed since it was made: its record no longer describes it
    source = read_source(folder)
    if source.get("base_sha256") and source.get("adapter_fingerprint"):
        return f"gguf-sha256:{source['base_sha256'][:16]}+lora:{source['adapter_fingerprint']}"
    if source.get("sha256"):
        return f"gguf-sha256:{source['sha256'][:16]}"
    return fingerprint(folder)
