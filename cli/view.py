"""``reflectagent view``: one self-contained HTML page of an eval report folder or a judgments file."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated, Optional

import typer

from reflectagent.eval.page import view as write_view


def view(
    source: Annotated[Path, typer.Argument(help="an eval report folder, or a JSONL file from `reflectagent judge -o`")],
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against", help="a second folder or file: both on one page, with a filter for where they disagree"
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="the page to write (default: FOLDER/report.html, or FILE with .html)"),
    ] = None,
    open_page: Annotated[bool, typer.Option("--open", help="open the page in the default browser")] = False,
):
    """Write the judgments as one HTML page (works offline) and print its path."""
    path = write_view(source, against, out)
    typer.echo(str(path))
    if open_page:
        webbrowser.open(path.resolve().as_uri())
