"""``reflectagent calibrate``: fit a program's P(A) on dev pairs and save it; an escalating program also gets its
threshold chosen there."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import dspy
import typer

from reflectagent.calling.backends import resolve_backend
from reflectagent.calling.cache import use_cache
from reflectagent.calling.config import load_settings
from reflectagent.cli.common import CacheDirOpt, ConfigOpt, fail, open_cache, warn_skipped
from reflectagent.errors import ReflectAgentError
from reflectagent.eval import load_benchmark
from reflectagent.judging.runs import RunInterrupted
from reflectagent.programs import Calibrated, EscalatingJudge, calibrate as fit, resolve_program
from reflectagent.programs.calibration import METHODS
from reflectagent.records.splits import split_pairs


def calibrate(
    data: Annotated[
        str, typer.Option("--data", "-d", help="benchmark files, comma-separated; their --split pairs are fitted on")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to save the calibrated program (JSON)")],
    program: Annotated[
        str, typer.Option("--program", "-p", help="a named program deciding by P(A), or a saved one (.json)")
    ] = "direct-prob",
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="backend name from the config")] = None,
    method: Annotated[
        str, typer.Option(help="temperature (keeps every verdict) or platt (slope and intercept)")
    ] = "temperature",
    split: Annotated[str, typer.Option(help="dev (or train); never test")] = "dev",
    seed: Annotated[int, typer.Option(help="split seed (eval --split draws the same pairs)")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="at most N pairs per data file (after the split)")] = None,
    max_calls: Annotated[
        Optional[float],
        typer.Option(
            help="escalating programs: the most LM calls per judgment, on average, "
            "the chosen threshold may spend on the dev pairs"
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="judgments at once")] = 8,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Fit temperature or Platt scaling of a program's P(A) on a dev split and save it with the program.

    Each pair is judged as given and swapped. An escalating program (escalating-prob) has every stage
    calibrated and its threshold chosen on the same pairs. The saved file records the fitted parameters and
    the split, files and pairs they came from; use it as --program of serve-rm or a reward adapter.
    """
    if split not in ("train", "dev"):
        fail(f"--split is dev or train, not {split!r}: never fit on the test split", 2)
    if method not in METHODS:
        fail(f"--method is one of {', '.join(METHODS)}", 2)
    files, pairs = [f for f in data.split(",") if f], []
    for name in files:
        if not Path(name).exists():
            fail(f"no such data file: {name}", 2)
        loaded, bad = load_benchmark(name)
        warn_skipped(bad)
        chosen = split_pairs(loaded, seed=seed)[split]
        pairs += chosen[:limit] if limit is not None else chosen
    if not any(p.label in ("A", "B") for p in pairs):
        fail(f"no pairs labelled A or B in the {split} split of {data}", 2)
    try:
        settings = load_settings(config)
        judge = resolve_program(program)
        options = {"max_calls_per_judgment": max_calls} if isinstance(judge, EscalatingJudge) else {}
        with use_cache(open_cache(settings, cache_dir)), dspy.context(lm=resolve_backend(backend, settings)):
            fitted = fit(
                judge,
                pairs,
                method,
                split=split,
                data=[f"{f} ({split} split, seed {seed})" for f in files],
                concurrency=concurrency,
                progress=sys.stderr.isatty(),
                **options,
            )
    except RunInterrupted:
        raise
    except (ReflectAgentError, ValueError) as exc:
        fail(str(exc), 2)
    for line in describe(fitted):
        typer.echo(line)
    typer.echo(f"saved: {fitted.save(out)}")


def describe(judge) -> list[str]:
    """What was fitted, in lines: each calibration with its log loss before and after, and the threshold table."""
    if isinstance(judge, Calibrated):
        c = judge.calibration
        return [
            f"{type(judge.inner).__name__}: {c.describe()} on {c.fitted_on['with_probability']} judgments of "
            f"{c.fitted_on['pairs']} pairs; log loss {c.log_loss_before:.4f} -> {c.log_loss_after:.4f}"
        ]
    lines = [f"stage {name}: {line}" for name, member in zip(judge.stages, judge.members) for line in describe(member)]
    chosen = judge.options.get("chosen_on", {})
    lines += ["threshold | dev accuracy | LM calls per judgment"]
    lines += [
        f"{t:9.3g} | {acc:12.1%} | {calls:.2f}" + ("  <- chosen" if t == judge.threshold else "")
        for t, acc, calls in chosen.get("table", [])
    ]
    return lines
