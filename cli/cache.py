"""``reflectagent cache``: where the judgment cache is, what it holds, and emptying it."""

from __future__ import annotations

import typer

from reflectagent.calling.config import load_settings
from reflectagent.cli.common import CacheDirOpt, ConfigOpt, open_cache

app = typer.Typer(help="Inspect or clear the judgment cache.", no_args_is_help=True)


@app.command("info")
def info(config: ConfigOpt = None, cache_dir: CacheDirOpt = None):
    """Where the judgment cache is and how much it holds."""
    facts = open_cache(load_settings(config), cache_dir, check=False).info()
    typer.echo(f"directory: {facts['directory']}\nentries: {facts['entries']}\nsize: {facts['bytes'] / 1e6:.1f} MB")


@app.command("clear")
def clear(config: ConfigOpt = None, cache_dir: CacheDirOpt = None):
    """Delete every cached judgment step."""
    removed = open_cache(load_settings(config), cache_dir, check=False).clear()
    typer.echo(f"removed {removed} entries")
