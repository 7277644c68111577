"""``reflectagent serve-rm``: the reward service (:mod:`reflectagent.rl.service`) under uvicorn, from the command line.

The command reads its options, the config and the token, and runs the app; every rule of the service (routes,
capacity, limits, errors, metrics) is the app's, beside the rewards in ``rl/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from reflectagent.calling.config import load_settings
from reflectagent.cli.common import CacheDirOpt, ConfigOpt, fail, open_cache
from reflectagent.rl.groups import ROUND_ROBIN_UP_TO
from reflectagent.rl.monitors import WINDOW
from reflectagent.rl.service import MAX_JUDGMENTS


def serve_rm(
    program: Annotated[
        str,
        typer.Option(
            "--program",
            "-p",
            help=(
                "a named program (see `judge --help`) or a saved program's .json file (from `reflectagent calibrate`)"
            ),
        ),
    ] = "genrm-prob",
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="backend name from the config")] = None,
    host: Annotated[str, typer.Option(help="address to bind: loopback unless you mean otherwise")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port")] = 5000,
    group: Annotated[str, typer.Option(help="group rewards without labels: win_rate or bradley_terry")] = "win_rate",
    no_verdict_reward: Annotated[
        Optional[float],
        typer.Option(
            help="the reward where no verdict stood behind it (flagged; default: 0.5, or 0 for bradley_terry)"
        ),
    ] = None,
    round_robin_up_to: Annotated[
        int,
        typer.Option(
            min=2,
            help=(
                "a group of up to this many distinct responses is judged round robin (every two), a larger one by tournament (N-1)"
            ),
        ),
    ] = ROUND_ROBIN_UP_TO,
    max_concurrency: Annotated[int, typer.Option(min=1, help="requests judged at once")] = 8,
    max_queue: Annotated[int, typer.Option(min=0, help="requests that may wait; beyond, 503 with Retry-After")] = 64,
    timeout: Annotated[
        float,
        typer.Option(min=0.001, help="seconds a request may take before a 504 (OpenRLHF's client gives up at 180)"),
    ] = 170,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body")] = 8 << 20,
    max_judgments: Annotated[
        int,
        typer.Option(
            min=1,
            help=(
                "most judgments one request may take (a round-robin group of N takes N(N-1)/2, a tournament N-1); beyond, 413"
            ),
        ),
    ] = MAX_JUDGMENTS,
    header_timeout: Annotated[
        float,
        typer.Option(
            min=0.001, help=("seconds a client has to send a request's headers; a slower one is disconnected")
        ),
    ] = 10,
    body_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="seconds a client has to send a request's body once its headers are in; a slower one is disconnected",
        ),
    ] = 60,
    token_env: Annotated[
        Optional[str], typer.Option(help="environment variable holding a bearer token to require")
    ] = None,
    monitor_window: Annotated[
        int,
        typer.Option(
            min=3, help=("judgments (and scored responses) the rolling health gauges in /metrics are computed over")
        ),
    ] = WINDOW,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Serve a judge as a reward model (OpenRLHF's /get_reward, /v1/judge, /v1/rank, /health, /metrics)."""
    import uvicorn

    from reflectagent.calling.cache import use_cache
    from reflectagent.rl import Rewarder
    from reflectagent.rl.http import service_config
    from reflectagent.rl.service import create_app

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            fail(f"${token_env} is not set: export the token there, or leave out --token-env", 2)
    for name, value in (
        ("max-concurrency", max_concurrency),
        ("max-queue", max_queue),
        ("timeout", timeout),
        ("max-body-bytes", max_body_bytes),
        ("max-judgments", max_judgments),
        ("header-timeout", header_timeout),
        ("body-timeout", body_timeout),
    ):
        if value <= 0 and not (name == "max-queue" and value == 0):
            fail(f"--{name} must be positive", 2)
    settings = load_settings(config)
    rewarder = Rewarder(
        program,
        backend,
        settings,
        group=group,
        no_verdict_reward=no_verdict_reward,
        concurrency=max_concurrency,
        round_robin_up_to=round_robin_up_to,
    )
    app = create_app(
        rewarder,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        timeout_s=timeout,
        max_body_bytes=max_body_bytes,
        token=token,
        max_judgments=max_judgments,
        monitor_window=monitor_window,
        judge_name=Path(program).stem if program.endswith(".json") else program,
    )
    with use_cache(open_cache(settings, cache_dir)):
        typer.echo(
            f"reward model: {program} on {rewarder.lm.model} at http://{host}:{port} (POST /get_reward, /v1/judge, /v1/rank)"
        )
        uvicorn.Server(
            service_config(app, host=host, port=port, header_timeout_s=header_timeout, body_timeout_s=body_timeout)
        ).run()
