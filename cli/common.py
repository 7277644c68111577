"""What several commands share: the config and cache options, input errors, the cache in force."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from reflectagent.calling.cache import JudgmentCache, configured_cache
from reflectagent.calling.config import Settings
from reflectagent.terminal import visible

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="TOML or YAML config (default: $REFLECTAGENT_CONFIG or ./reflectagent.toml)"),
]
CacheDirOpt = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="judgment cache folder (default: $REFLECTAGENT_CACHE_DIR or the user cache)"),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """``error: <message>`` on stderr (control characters from data shown, not sent) and exit ``code``."""
    typer.secho(f"error: {visible(message, keep=chr(10))}", fg="red", err=True)
    raise typer.Exit(code)


def open_cache(settings: Settings, cache_dir: Path | None, no_cache: bool = False, check: bool = True) -> JudgmentCache:
    """--cache-dir, else the cache the config configures, in the library's order (:func:`configured_cache`).
    ``check``: a cache that cannot be written (read-only, full, Redis away) is an error now, before any judging."""
    cache = configured_cache(settings, cache_dir, enabled=not no_cache)
    return cache.check() if check else cache


def warn_skipped(bad_lines) -> None:
    for line in bad_lines:
        typer.secho(f"skipped {line}", fg="yellow", err=True)  # BadLine's text is made visible


def warn_duplicates(ids) -> None:
    from reflectagent.records.pairs import duplicate_ids

    repeated = duplicate_ids(ids)
    if repeated:
        shown = visible(", ".join(f"{key!r} x{n}" for key, n in list(repeated.items())[:5]))
        typer.secho(
            f"warning: {len(repeated)} id(s) name more than one pair ({shown}{', ...' if len(repeated) > 5 else ''}): "
            "each pair is judged; give unique ids to tell their judgments apart",
            fg="yellow",
            err=True,
        )
