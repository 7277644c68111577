"""``reflectagent finetune``: distil teacher traces into data, train (SFT, STaR-DPO), merge, or run the loop."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from reflectagent.calling.cache import use_cache
from reflectagent.calling.config import load_settings
from reflectagent.cli.common import CacheDirOpt, ConfigOpt, fail, open_cache, warn_skipped
from reflectagent.errors import ReflectAgentError
from reflectagent.eval import load_benchmark
from reflectagent.records.splits import SPLITS, prompt_disjoint, split_pairs

app = typer.Typer(help="Distil judge traces into training data and fine-tune with LoRA.", no_args_is_help=True)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def dataclass_flags(ctx: typer.Context, *kinds):
    """Parse the remaining arguments into the given dataclasses (transformers' HfArgumentParser)."""
    from transformers import HfArgumentParser

    if "--help" in ctx.args or "-h" in ctx.args:
        HfArgumentParser(kinds).print_help()
        raise typer.Exit(0)
    return HfArgumentParser(kinds).parse_args_into_dataclasses(args=ctx.args)


@app.command("data", context_settings=PASSTHROUGH)
def data(
    ctx: typer.Context,
    data: Annotated[
        Optional[str], typer.Option("--data", "-d", help="labelled pair files, comma-separated (the backend teaches)")
    ] = None,
    teacher_file: Annotated[
        Optional[Path],
        typer.Option(
            "--teacher-file", help="a file of strong-model judgments that teaches instead (the backend is the student)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the datasets and the data card")] = Path(
        "runs/data"
    ),
    backend_name: Annotated[
        Optional[str],
        typer.Option(
            "--backend",
            "-b",
            help="the teacher's backend, or the student's with --teacher-file or --kind verdict (the rows are rendered as it is served; default: the configured default; use temperature > 0)",
        ),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="analyses per pair (alternating orders)")] = 4,
    temperature: Annotated[float, typer.Option(min=0.0, help="temperature of samples after the first")] = 0.8,
    limit: Annotated[Optional[int], typer.Option(help="at most N pairs per file")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="pairs judged at once")] = 8,
    kind: Annotated[
        str,
        typer.Option(
            help="'unified' (analyses and reflections, from a teacher), 'verdict' (the verdict alone, from the labels: no LM call) or 'rationale' (a --teacher-file's own analyses then its verdict, GenRM's rationales: no LM call)"
        ),
    ] = "unified",
    reflections: Annotated[
        str,
        typer.Option(
            help="with --teacher-file: who writes the reflections on the student's wrong analyses: 'student' (told the answer, it rationalises one) or 'teacher' (the teacher's analysis in a fixed frame; no LM call: a small student's rationalised reflections can be empty)"
        ),
    ] = "student",
    split: Annotated[
        str,
        typer.Option(
            help="all, or the train, dev or test split of each --data file (seeded, stratified by source, as `eval --split` draws it)"
        ),
    ] = "all",
    split_seed: Annotated[int, typer.Option(help="the seed of --split")] = 0,
    from_cache: Annotated[
        bool,
        typer.Option(
            "--from-cache",
            help="mine the judgment cache instead of judging: the program's order-inconsistent or low-margin judgments of the --data pairs on --backend become STaR and STaR-DPO rows (no LM call; pairs not in the cache are counted and skipped)",
        ),
    ] = False,
    program: Annotated[
        Optional[str],
        typer.Option(
            "--program",
            "-p",
            help="with --from-cache: the program whose cached judgments are mined (a named program or a saved .json; default: the teacher this command runs, ReflectRM with --samples and --temperature)",
        ),
    ] = None,
    margin: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.5, help="with --from-cache: a judgment whose |P(A) - 0.5| is under this is low-margin"
        ),
    ] = 0.1,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Build training data: a teacher program (ReflectRM) over labelled pairs, a file of judgments, (``--kind verdict``) the labels alone, (``--kind rationale``) a file's own analyses alone, or (``--from-cache``) the judge's own doubts in the judgment cache.

    More flags (DataConfig): --ratio, --rationalize, --fractions, --seed, --context_chars.
    """
    from reflectagent.finetune import DataConfig, distil, distil_file, label_data, teacher_data
    from reflectagent.records.teacher import read_teacher

    if (data is None) == (teacher_file is None):
        fail("give one of --data (pairs the backend judges) or --teacher-file (judgments that teach)", 2)
    if kind not in ("unified", "verdict", "rationale"):
        fail(f"--kind is 'unified', 'verdict' or 'rationale', not {kind!r}", 2)
    if reflections not in ("student", "teacher"):
        fail(f"--reflections is 'student' or 'teacher', not {reflections!r}", 2)
    if reflections != "student" and (teacher_file is None or kind != "unified"):
        fail("--reflections chooses who reflects on a --teacher-file's pairs (--kind unified): give --teacher-file", 2)
    if kind == "rationale" and teacher_file is None:
        fail(
            "--kind rationale trains on a teacher file's own analyses: give --teacher-file (labelled pairs carry no "
            "analysis; --kind unified has the backend write them)",
            2,
        )
    if split not in ("all", *SPLITS):
        fail(f"--split is one of all, {', '.join(SPLITS)}, not {split!r}", 2)
    if split != "all" and teacher_file is not None:
        fail(
            "--split draws from --data files; a teacher file is used whole (leave out what you test on when you write it)",
            2,
        )
    if from_cache and (teacher_file is not None or kind != "unified"):
        fail("--from-cache mines judgments of --data pairs into STaR rows: leave out --teacher-file and --kind", 2)
    if from_cache and split not in ("train", "dev"):
        fail(
            f"--from-cache needs --split train (or dev): the cache also holds the judgments an eval made of test pairs, "
            f"and mining {'them' if split == 'test' else 'every split'} would train the judge on what it is measured on",
            2,
        )
    if program is not None and not from_cache:
        fail("--program names the judge whose cached judgments --from-cache mines: add --from-cache", 2)
    (data_config,) = dataclass_flags(ctx, DataConfig)
    settings = load_settings(config)
    options = dict(samples=samples, temperature=temperature, concurrency=concurrency, progress=sys.stderr.isatty())
    if teacher_file is not None:
        if not teacher_file.exists() or teacher_file.is_dir():
            fail(f"no such teacher file: {teacher_file}", 2)
        try:
            judgments, bad = read_teacher(teacher_file, limits=settings.reading)
        except ReflectAgentError as exc:  # a device, a file over a limit: the file to fix
            fail(str(exc), 2)
        warn_skipped(bad)
        judgments = judgments[:limit]
        if kind == "verdict":
            card = {
                "labels": "each row's own label where it has one, else the teacher's preference",
                "teachers": sorted({j.teacher for j in judgments}),
            }
            built = label_data([j.pair for j in judgments], backend_name, settings, out, data_config, card)
        elif kind == "rationale":
            built = teacher_data(judgments, backend_name, settings, out, data_config)
        else:
            with use_cache(open_cache(settings, cache_dir)):
                built = distil_file(
                    judgments, backend_name, settings, out, data_config, reflections=reflections, **options
                )
    else:
        pairs, held_out = [], []
        for name in [f for f in data.split(",") if f]:
            if not Path(name).exists():
                fail(f"no such data file: {name}", 2)
            try:
                loaded, bad = load_benchmark(name, limits=settings.reading)
            except ReflectAgentError as exc:
                fail(str(exc), 2)
            warn_skipped(bad)
            splits = split_pairs(loaded, seed=split_seed) if split != "all" else {}
            chosen = splits.get(split, loaded)
            held_out += splits.get("dev", []) + splits.get("test", []) if split == "train" else []
            pairs += chosen[:limit] if limit is not None else chosen
        kept = prompt_disjoint(pairs, held_out)  # nothing that shares a prompt with any file's dev or test pairs
        shared_prompt, pairs = len(pairs) - len(kept), kept
        if not pairs:
            fail(
                f"no pairs to build data from (the {split} split of {data})"
                if split != "all"
                else f"no pairs in {data}",
                2,
            )
        if shared_prompt:
            typer.secho(
                f"left out {shared_prompt} train pair(s) that share a prompt with a dev or test pair",
                fg="yellow",
                err=True,
            )
        card = {
            "labels": "the data files' own labels",
            "split": split,
            "split_seed": split_seed,
            "train_pairs_left_out_for_sharing_a_dev_or_test_prompt": shared_prompt,
        }
        if kind == "verdict":
            built = label_data(pairs, backend_name, settings, out, data_config, card)
        elif from_cache:
            built = _mine(
                pairs,
                program,
                backend_name,
                settings,
                out,
                data_config,
                cache_dir,
                samples=samples,
                temperature=temperature,
                margin=margin,
                concurrency=concurrency,
                card=card,
            )
        else:
            with use_cache(open_cache(settings, cache_dir)):
                built = distil(pairs, backend_name, settings, out, data_config, **options, card=card)
    typer.echo(json.dumps(built.stats, indent=2))
    if from_cache:
        if not any(built.splits.values()) and not any(built.dpo.values()):
            fail(
                f"no rows were mined (see the card above: pairs not in the cache were judged by no run of this program on "
                f"this backend; confident ones teach nothing here); nothing in {out} to train on",
                1,
            )
        typer.echo(
            f"datasets: {out}/unified (STaR rows from the judge's doubts), {out}/dpo where an order had a right and a "
            f"wrong analysis; card: {out}/data_card.json"
        )
        return
    if kind in ("verdict", "rationale"):
        if not built.splits.get("train"):
            fail(
                f"no training rows were made (see the card above: ties, unlabelled pairs and prompts too long for the "
                f"backend's context make none); nothing in {out} to train on",
                1,
            )
        judged_by = "direct-prob" if kind == "verdict" else "genrm-prob"
        typer.echo(
            f"datasets: {out}/unified (SFT, {kind} rows: train it, then judge with --program {judged_by}); card: {out}/data_card.json"
        )
        return
    dpo_note = (
        f", {out}/dpo (STaR-DPO)"
        if (out / "dpo").exists()
        else " (no STaR-DPO triples: no order had a right and a wrong analysis)"
    )
    typer.echo(f"datasets: {out}/unified (SFT){dpo_note}; card: {out}/data_card.json")


def _mine(
    pairs,
    program: str | None,
    backend_name,
    settings,
    out: Path,
    data_config,
    cache_dir,
    *,
    samples: int,
    temperature: float,
    margin: float,
    concurrency: int,
    card: dict,
):
    from reflectagent.finetune import mine
    from reflectagent.programs import ReflectRM, resolve_program

    try:
        judge = resolve_program(program) if program else ReflectRM(samples=samples, temperature=temperature)
    except (ReflectAgentError, ValueError, OSError) as exc:
        fail(str(exc), 2)
    card = {**card, "mined_program": program or f"ReflectRM(samples={samples}, temperature={temperature})"}
    with use_cache(open_cache(settings, cache_dir, check=False)):  # read, never written
        return mine(
            pairs,
            judge,
            backend_name,
            settings,
            out,
            data_config,
            margin=margin,
            concurrency=concurrency,
            progress=sys.stderr.isatty(),
            card=card,
        )


@app.command("train", context_settings=PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context):
    """LoRA fine-tuning on the unified data (flags: SFTJobConfig, e.g. --data runs/data/unified --max_steps 200)."""
    from reflectagent.finetune import SFTJobConfig, train_sft

    (job,) = dataclass_flags(ctx, SFTJobConfig)
    adapter = train_sft(job)
    typer.echo(f"adapter: {adapter}\nserve it: reflectagent serve --lora judge={adapter}")


@app.command("run")
def run(
    config_file: Annotated[
        Optional[Path], typer.Option("--config", help="loop config (YAML/TOML): see LoopConfig")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (overrides output_dir)")] = None,
    settings_file: Annotated[
        Optional[Path], typer.Option("--settings", help="backend settings file (the teacher's backend)")
    ] = None,
    cache_dir: CacheDirOpt = None,
):
    """The whole loop: teacher traces -> data -> LoRA (response-only, unified) + Bradley-Terry -> serve -> eval report.

    Re-running the same command resumes: finished stages are skipped, judged steps come from the cache.
    """
    from reflectagent.finetune.loop import Loop
    from reflectagent.finetune.loop_config import load_loop_config

    try:
        loop_config = load_loop_config(config_file, **({"output_dir": str(out)} if out else {}))
    except ReflectAgentError as exc:
        fail(str(exc), 2)
    settings = load_settings(settings_file)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop its servers on `kill`, as on Ctrl-C
    with use_cache(open_cache(settings, cache_dir)):
        report = Loop(loop_config, settings, progress=sys.stderr.isatty()).run()
    typer.echo(report.read_text())
    typer.echo(f"report: {report}")


@app.command("merge")
def merge(
    adapter: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the merged model folder")],
    base_model: Annotated[
        str, typer.Option("--base-model", help="'embedded' or the adapter's base model folder")
    ] = "embedded",
):
    """Merge a LoRA adapter into its base model: a full folder vLLM serves as a plain model (faster on CPU)."""
    from reflectagent.finetune.export import merge_adapter

    try:
        typer.echo(merge_adapter(adapter, out, base_model))
    except FileNotFoundError as exc:
        fail(str(exc), 2)


@app.command("dpo", context_settings=PASSTHROUGH, add_help_option=False)
def dpo(ctx: typer.Context):
    """STaR-DPO on top of an SFT adapter (flags: DPOJobConfig, e.g. --data runs/data/dpo --sft_adapter runs/sft/adapter)."""
    from reflectagent.finetune.dpo import DPOJobConfig, train_dpo

    (job,) = dataclass_flags(ctx, DPOJobConfig)
    merged = train_dpo(job)
    typer.echo(f"merged model: {merged}\nserve it: reflectagent serve {merged}")
