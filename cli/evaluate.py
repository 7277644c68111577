"""``reflectagent eval`` and ``reflectagent compare``: judges on benchmarks, and two reports side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from reflectagent.calling.cache import use_cache
from reflectagent.calling.config import load_settings
from reflectagent.cli.common import CacheDirOpt, ConfigOpt, fail, open_cache, warn_duplicates, warn_skipped
from reflectagent.errors import ReflectAgentError
from reflectagent.eval import load_benchmark, run_eval, write_report
from reflectagent.eval import compare as compare_reports
from reflectagent.eval.report import split_baseline, summary_markdown
from reflectagent.judging.runs import RunInterrupted
from reflectagent.programs import NAMED
from reflectagent.records.splits import SPLITS, split_pairs
from reflectagent.terminal import visible


def eval_command(
    data: Annotated[
        str, typer.Option("--data", "-d", help="benchmark files, comma-separated (JSONL, or datasets folders/files)")
    ],
    programs: Annotated[
        str, typer.Option("--programs", "-p", help=f"comma-separated, of: {', '.join(NAMED)}")
    ] = "genrm-both,reflectrm",
    backends: Annotated[str, typer.Option("--backends", "-b", help="comma-separated backend names")] = "embedded",
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder")] = Path("reports/latest"),
    limit: Annotated[Optional[int], typer.Option(help="at most N pairs per data file (after the split)")] = None,
    split: Annotated[str, typer.Option(help="all, train, dev or test (seeded, stratified by source)")] = "all",
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="judgments at once")] = 8,
    no_verdict: Annotated[
        str, typer.Option(help="how a missing verdict scores: 'wrong' (0) or 'half' (RewardBench)")
    ] = "wrong",
    baseline: Annotated[
        Optional[str],
        typer.Option(
            help="the run the others are paired against, pair by pair: 'PROGRAM' or 'PROGRAM@BACKEND' (default: the first)"
        ),
    ] = None,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Compare programs x backends on benchmarks; write a report folder (markdown, JSON, plots).

    Interrupted, the same command resumes from the judgment cache and writes the same report.
    """
    if split not in ("all", *SPLITS):
        fail("--split is one of all, train, dev, test", 2)
    if no_verdict not in ("wrong", "half"):
        fail("--no-verdict is 'wrong' or 'half'", 2)
    try:
        settings = load_settings(config)  # first: its [reading] table bounds the data files
    except ReflectAgentError as exc:
        fail(str(exc), 2)
    pairs, files = [], [f for f in data.split(",") if f]
    for name in files:
        if not Path(name).exists():
            fail(f"no such data file: {name}", 2)
        try:
            loaded, bad = load_benchmark(name, limits=settings.reading)
        except ReflectAgentError as exc:  # a device, a file over a limit: the file to fix
            fail(str(exc), 2)
        warn_skipped(bad)
        chosen = loaded if split == "all" else split_pairs(loaded, seed=seed)[split]
        pairs += chosen[:limit] if limit is not None else chosen
    if not pairs:
        fail("no valid pairs to evaluate", 2)
    warn_duplicates(pair.id for pair in pairs)
    program_names, backend_names = [p for p in programs.split(",") if p], [b for b in backends.split(",") if b]
    if baseline is not None:  # checked before judging: a report that cannot be written would waste the run
        program, backend = split_baseline(baseline)
        if program not in program_names or (backend and backend not in backend_names):
            fail(
                f"--baseline {baseline!r} is not one of the runs: give one of --programs ({', '.join(program_names)}), "
                f"optionally @ one of --backends ({', '.join(backend_names)})",
                2,
            )
    try:
        with use_cache(open_cache(settings, cache_dir)):
            results = run_eval(
                pairs,
                program_names,
                backend_names,
                settings=settings,
                concurrency=concurrency,
                no_verdict=no_verdict,
                progress=sys.stderr.isatty(),
            )
    except RunInterrupted:
        raise  # a dead backend: exit 1, the message says how to resume
    except ReflectAgentError as exc:
        fail(str(exc), 2)  # a config, backend or program name to fix
    meta = {
        "data": files,
        "pairs": len(pairs),
        "split": split,
        "seed": seed,
        "limit": limit,
        "programs": program_names,
        "backends": backend_names,
        "no_verdict": no_verdict,
        "baseline": baseline,
    }
    folder = write_report(results, out, meta)
    typer.echo(visible(summary_markdown(results, meta), keep="\n"))  # categories and sources come from the data
    typer.echo(f"report: {folder}/report.md (JSON: report.json, plots: plots/)")


def compare(
    before: Annotated[Path, typer.Argument(help="report folder")],
    after: Annotated[Path, typer.Argument(help="report folder")],
):
    """Print each metric of two eval reports side by side, with the change."""
    for folder in (before, after):
        if not (folder / "report.json").exists():
            fail(f"{folder} holds no report.json", 2)
    typer.echo(visible(compare_reports(before, after), keep="\n"))
