"""``reflectagent serve``: a model (and LoRA adapters) behind vLLM's OpenAI-compatible server until Ctrl-C."""

from __future__ import annotations

import shlex
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from reflectagent.calling.config import DTYPES
from reflectagent.cli.common import fail
from reflectagent.serving.embedded import SERVED_NAME, publish, withdraw
from reflectagent.serving.models import default_dtype, prepare_model
from reflectagent.serving.server import ServerSpec, VLLMServer
from reflectagent.serving.sources import DEFAULT_CONTEXT, DEFAULT_DTYPE, default_context


def parse_loras(items: list[str]) -> dict[str, str]:
    loras = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            fail(f"--lora takes NAME=DIR, got {item!r}", 2)
        if not Path(path).is_dir():
            fail(f"LoRA folder not found: {path}", 2)
        loras[key] = str(Path(path).resolve())
    return loras


OWN_FLAGS = {
    "--model": "give the model as the MODEL argument",
    "--served-model-name": "use --name",
    "--host": "it serves on loopback only; put a proxy in front to expose it",
    "--port": "use --port",
    "--dtype": "use --dtype",
    "--max-model-len": "use --max-model-len",
    "--lora-modules": "use --lora NAME=DIR",
    "--enable-lora": "use --lora NAME=DIR",
    "--max-lora-rank": "use --max-lora-rank",
}  # vLLM flags this command sets itself, and what to use instead


def vllm_args(text: str) -> list[str]:
    """``--vllm-args``, split as a shell would and passed on as they are; a flag this command sets itself is refused
    with the option to use instead (a later duplicate would silently win in vLLM's parser)."""
    try:
        extra = shlex.split(text)
    except ValueError as exc:
        fail(f"--vllm-args could not be split like a shell line ({exc}): check its quotes", 2)
    for arg in extra:
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in OWN_FLAGS:
            fail(f"{flag} in --vllm-args is set by `reflectagent serve` itself: {OWN_FLAGS[flag]}", 2)
    return extra


def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="'embedded' (packaged SmolLM2), a preset (see `models prepare`), a model folder, or a hub id"
        ),
    ] = "embedded",
    lora: Annotated[
        Optional[list[str]], typer.Option("--lora", help="LoRA adapter to serve, NAME=DIR (repeatable)")
    ] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default: a free one)")] = None,
    name: Annotated[
        Optional[str], typer.Option("--name", help="served model name (default: 'embedded' or the folder name)")
    ] = None,
    max_model_len: Annotated[
        Optional[int], typer.Option(help=f"context length (default: the model preset's, else {DEFAULT_CONTEXT})")
    ] = None,
    max_lora_rank: Annotated[int, typer.Option(min=1, help="largest LoRA rank to accept")] = 64,
    dtype: Annotated[
        Optional[str], typer.Option(help=f"{', '.join(DTYPES)} (default: the model preset's, else {DEFAULT_DTYPE})")
    ] = None,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds to wait for the server to answer")] = 600,
    vllm: Annotated[
        str,
        typer.Option(
            "--vllm-args",
            help="more vLLM server flags, as one string: e.g. --vllm-args '--max-num-seqs 16 --gpu-memory-utilization 0.8'",
        ),
    ] = "",
):
    """Serve a model (and LoRA adapters) with vLLM's OpenAI-compatible server until Ctrl-C."""
    loras = parse_loras(lora or [])
    extra = vllm_args(vllm)
    folder = prepare_model(model)
    embedded = model == "embedded"
    served = name or (SERVED_NAME if embedded else Path(folder).name)
    dtype = dtype or default_dtype(folder)
    if dtype not in DTYPES:
        fail(f"--dtype takes {', '.join(DTYPES)}, not {dtype!r}", 2)
    server = VLLMServer(
        ServerSpec(
            model_dir=str(folder),
            served_name=served,
            loras=loras,
            port=port,
            dtype=dtype,
            max_model_len=max_model_len or default_context(folder),
            max_lora_rank=max_lora_rank,
            extra_args=extra,
        )
    )
    # Ctrl-C and SIGTERM both stop the server, even where SIGINT was ignored (nohup, `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        starting = time.perf_counter()
        url = server.start(timeout_s=timeout)
        ready_s = time.perf_counter() - starting
        if embedded:
            publish(url, loras, dtype)
        typer.echo(f"serving {served} ({folder}, {dtype}) at {url}")
        typer.echo(f"ready in {ready_s:.0f} s")
        for key in loras:
            typer.echo(f"  adapter {key}: model name '{key}' (LiteLLM: hosted_vllm/{key})")
        typer.echo(f"LiteLLM model string: hosted_vllm/{served}, api_base {url}. Ctrl-C stops the server.")
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        fail(f"the server exited; log tail:\n{server.log_tail()}")
    except KeyboardInterrupt:
        typer.echo("stopping the server")
    finally:
        server.stop()
        if embedded:
            withdraw(server.url)
