"""``reflectagent models``: model folders for serving and fine-tuning."""

from __future__ import annotations

from typing import Annotated

import typer

from reflectagent.serving.models import prepare_model
from reflectagent.serving.presets import PRESETS

app = typer.Typer(help="Prepare model folders for serving and fine-tuning.", no_args_is_help=True)


@app.command("prepare")
def prepare(
    source: Annotated[
        str, typer.Argument(help=f"'embedded', a preset ({', '.join(PRESETS)}), a local model folder, or a hub id")
    ] = "embedded",
    force: Annotated[bool, typer.Option(help="convert again even if the folder exists")] = False,
):
    """Make a Hugging Face model folder (the embedded GGUF and presets are converted once and reused)."""
    typer.echo(prepare_model(source, force=force))
