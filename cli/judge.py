"""``reflectagent judge``: judge pairs and print verdicts, analyses and a summary."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Optional

import dspy
import typer
from tqdm.auto import tqdm

from reflectagent.calling.backends import resolve_backend
from reflectagent.calling.cache import use_cache
from reflectagent.calling.concurrency import run_sync
from reflectagent.calling.config import DTYPES, OverrideError, load_settings
from reflectagent.cli.common import CacheDirOpt, ConfigOpt, fail, open_cache, warn_duplicates, warn_skipped
from reflectagent.errors import ReflectAgentError
from reflectagent.eval.metrics import JudgingSummary, JudgingTally
from reflectagent.judging.runs import judge_in_order
from reflectagent.programs import NAMED, load_program, named_program
from reflectagent.records.output import AtomicOutput, OutputError
from reflectagent.records.pairs import InvalidPair, Pair, PairFile, read_pairs, sample_path
from reflectagent.records.results import Judgment
from reflectagent.terminal import visible


def judgment_lines(pair: Pair, judgment: Judgment, show_analyses: bool) -> list[str]:
    """What ``judge`` prints for one judgment: its verdict, notes and (``show_analyses``) each step. Every text
    from the data or the model (ids, analyses, raw output) has its control characters made visible: an ANSI
    escape in an id or a response echoed by the model must not act on the terminal."""
    lines = []
    verdict = judgment.preference or f"none ({judgment.reason})"
    label = f"  label {pair.label}" if pair.label else ""
    mark = ""
    if pair.label in ("A", "B"):
        mark = "  ✓" if judgment.preference == pair.label else "  ✗"
    cached = "  [cached]" if judgment.steps and judgment.cache_hits == len(judgment.steps) else ""
    lines.append(f"{pair.id or '-'}: verdict {verdict}{label}{mark}{cached}")
    for note in judgment.notes:
        lines.append(f"    note: {note}")
    if show_analyses:
        for a in judgment.analyses:
            order = "B,A" if a.swapped else "A,B"
            prob = f" p={a.probability:.2f}" if a.probability is not None else ""
            text = a.text.replace("\n", " ")[:160] if a.parsed else (a.error or "")[:160]
            lines.append(f"    [{order}] -> {a.preference or 'unparsed'}{prob}: {text}")
        for r in judgment.reflections:
            choice = f"analysis {r.more_reliable + 1}" if r.more_reliable is not None else "unparsed"
            text = r.text.replace("\n", " ")[:120] if r.parsed else (r.error or "")[:120]
            lines.append(f"    reflect({r.first + 1} vs {r.second + 1}) -> {choice}: {text}")
        for g in judgment.ratings:
            score = f" (expected {g.score:.2f})" if g.score is not None else ""
            lines.append(f"    rate {g.response} -> {g.rating if g.parsed else g.error}{score}")
    return [visible(line) for line in lines]


def print_summary(summary: JudgingSummary, bad_lines: int, wall_s: float) -> None:
    reasons = ", ".join(f"{n} {reason}" for reason, n in summary.no_verdict.items())
    typer.echo(f"pairs: {summary.judged} judged, {bad_lines} bad lines skipped")
    typer.echo(
        f"verdicts: {summary.verdicts}; no verdict: {summary.judged - summary.verdicts}"
        + (f" ({reasons})" if reasons else "")
    )
    if summary.labelled:
        typer.echo(
            f"accuracy on labelled pairs: {summary.correct}/{summary.labelled} = {summary.accuracy:.1%} "
            "(no verdict counts as wrong)"
        )
    typer.echo(f"parse failures: {summary.unparsed_steps} of {summary.steps} steps")
    typer.echo(
        f"LM calls: {summary.lm_calls}; cache hits: {summary.cached_judgments} of {summary.judged} judgments "
        f"({summary.cached_steps} of {summary.steps} steps)"
    )
    typer.echo(f"tokens: {summary.prompt_tokens} prompt, {summary.completion_tokens} completion")
    if wall_s > 0:
        typer.echo(
            f"wall time: {wall_s:.1f} s (a server started on demand included); "
            f"{summary.judged / wall_s * 60:.1f} judgments per minute"
        )


def judge(
    file: Annotated[
        Optional[Path], typer.Argument(help="JSONL of pairs (prompt, response_a, response_b[, id, label, ...])")
    ] = None,
    prompt: Annotated[Optional[str], typer.Option(help="judge one pair given on the command line")] = None,
    a: Annotated[Optional[str], typer.Option("--a", help="response A, with --prompt")] = None,
    b: Annotated[Optional[str], typer.Option("--b", help="response B, with --prompt")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="judge the real pairs shipped with reflectagent")] = False,
    program_name: Annotated[str, typer.Option("--program", "-p", help=f"one of: {', '.join(NAMED)}")] = "swap",
    load: Annotated[
        Optional[Path], typer.Option("--load", help="a compiled program saved with .save() (overrides --program)")
    ] = None,
    backend_name: Annotated[
        Optional[str],
        typer.Option(
            "--backend", "-b", help="backend name from the config (default: $REFLECTAGENT_BACKEND or 'embedded')"
        ),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="judge only the first N pairs")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="pairs judged at once")] = 8,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            help=(
                f"embedded backends: the dtype the server computes in, one of {', '.join(DTYPES)} (default: the backend's). "
                "bfloat16 judged 2.5x as fast as float32 on a CPU with avx512_bf16/AMX; float32 gives finer probabilities"
            )
        ),
    ] = None,
    engine: Annotated[
        Optional[str],
        typer.Option(
            help=(
                "embedded backends: the local engine that serves the model, vllm or llama.cpp (default: the backend's). "
                "llama.cpp serves a preset's GGUF as it ships (see docs/configuration.md)"
            )
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help=(
                "write every judgment as JSONL here: replaced whole when the run ends (a failed, interrupted or killed run "
                "keeps its finished judgments in OUTPUT.partial, or .partial.2 ... beside an earlier one, and leaves OUTPUT as "
                "it was); never the input file"
            ),
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="verdicts only, no analyses")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="neither read nor write the judgment cache")] = False,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Judge pairs and print verdicts, analyses and a summary.

    The default program ('swap') analyses each pair in both orders and gives a verdict when
    the two agree; 'reflectrm' adds ReflectRM's reflection stage. Judgments are cached:
    running the same command again costs no LM calls.
    """
    if sum([file is not None, prompt is not None, sample]) != 1:
        fail("give exactly one of: a JSONL FILE, --prompt with --a and --b, or --sample", 2)
    with _terminate_as_interrupt() as signals:
        settings = load_settings(config)  # first: its [reading] table bounds the file
        try:  # before any pair is read or judged: an output that cannot be written, or would erase the input, wastes nothing
            out = (
                AtomicOutput(output, [file] if file is not None else [sample_path()] if sample else [], report=_warn)
                if output
                else None
            )
        except OutputError as exc:
            fail(str(exc), 2)
        bad = []
        try:
            if prompt is not None:
                if a is None or b is None:
                    fail("--prompt needs both --a and --b", 2)
                pairs = [Pair(prompt=prompt, response_a=a, response_b=b, id="cli")]
            else:
                path = sample_path() if sample else file
                if path.is_file():  # read as judged, not held: memory stays flat however long the file
                    pairs = PairFile(path, limit, settings.reading)
                    bad = pairs.bad_lines
                else:  # a pipe, or what is not there (read_pairs says what is wrong)
                    pairs, bad = read_pairs(path, settings.reading)
                    pairs = pairs[:limit] if limit is not None else pairs
            program = load_program(load) if load else named_program(program_name)
        except InvalidPair as exc:
            fail(f"invalid pair: {exc}", 2)
        except ReflectAgentError as exc:  # a file, a program name or program file to fix: a usage error
            fail(str(exc), 2)
        warn_skipped(bad)
        warn_duplicates(pairs.ids if isinstance(pairs, PairFile) else [pair.id for pair in pairs])
        if not pairs:
            fail(
                "no valid pairs to judge"
                + (
                    f": every line was skipped ({len(bad)}, above)"
                    if bad
                    else f": {file} holds no pairs (it is empty or blank)"
                    if file and limit is None
                    else ""
                ),
                2,
            )

        overrides = {k: v for k, v in {"dtype": dtype, "engine": engine}.items() if v is not None}
        if overrides:
            try:
                settings = settings.overriding(backend_name, **overrides)
            except OverrideError as exc:  # a flag to fix: a usage error; an unknown backend stays the error it is
                fail(f"{' '.join('--' + k for k in overrides)}: {exc}", 2)
        lm = resolve_backend(backend_name, settings)
        started, tally = time.perf_counter(), JudgingTally()
        with use_cache(open_cache(settings, cache_dir, no_cache)), dspy.context(lm=lm), ExitStack() as writing:
            if out:
                try:  # the lock, before the first judgment: a second writer of the same file stops here
                    writing.enter_context(out)
                except OutputError as exc:
                    fail(str(exc), 2)
            try:
                run_sync(_judge_and_print(program, pairs, concurrency, tally, out, show_analyses=not quiet))
            except ReflectAgentError as exc:  # the backend went away, or the file changed under the run
                fail(f"{exc}\n{out.stop()}" if out else str(exc), 1)  # stopped first: the note says what was kept
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (above)
                if not out:
                    raise
                how = ("stopped by SIGTERM", 128 + signal.SIGTERM) if signals else ("interrupted", 130)
                fail(f"{how[0]} after {tally.counts['judged']} of {len(pairs)} judgments: {out.stop()}", how[1])
            if out:
                try:
                    out.finish()
                # judged, but the file could not be written (a full disk): the message says where the lines are
                except OutputError as exc:
                    fail(str(exc), 1)
        wall = time.perf_counter() - started

        typer.echo("")
        typer.echo(f"program: {type(program).__name__} {program.options}")
        where = lm.api_base or (
            "no server needed: every step came from the cache" if lm.backend.start else "provider default"
        )
        typer.echo(f"backend: {lm.backend.name} ({lm.backend.model} at {where})")
        print_summary(tally.summary(), len(bad), wall)
        if out:
            typer.echo(f"judgments: {out.given} ({out.lines} lines)")


@contextmanager
def _terminate_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM (``kill``, ``timeout``) stops ``judge`` as Ctrl-C does, so ``-o`` keeps and reports what was finished
    instead of dying with it in a hidden temporary; the signals received are listed. The previous handler comes back
    after (the command may run inside another program, a test)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield received
        return

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn(note: str) -> None:
    typer.secho(f"warning: {visible(note)}", fg="yellow", err=True)


async def _judge_and_print(
    program,
    pairs: list[Pair] | PairFile,
    concurrency: int,
    tally: JudgingTally,
    output: AtomicOutput | None,
    show_analyses: bool,
) -> None:
    """Each judgment printed, written and counted as it comes (in input order) and then let go, so a run of
    any size holds only the pairs in flight."""
    progress = sys.stderr.isatty()
    with tqdm(total=len(pairs), desc=type(program).__name__, unit="pair", disable=not progress) as bar:
        async for pair, judgment in judge_in_order(program, pairs, concurrency=concurrency):
            for line in judgment_lines(pair, judgment, show_analyses):
                if progress:
                    bar.write(line, file=sys.stdout)  # above the bar, which stays at the bottom
                else:
                    typer.echo(line)
            if output:
                output.write(json.dumps({"pair": pair.to_dict(), "judgment": judgment.to_dict()}, ensure_ascii=False))
            tally.add(pair, judgment)
            bar.update()
