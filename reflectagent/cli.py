"""The ``reflectagent`` command line: judge pairs, serve models, prepare models, manage the cache."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Generative reward models: LLM judges that write an analysis before their verdict.",
    no_args_is_help=True, pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Prepare model folders for serving and fine-tuning.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect or clear the judgment cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML or YAML config (default: $REFLECTAGENT_CONFIG or ./reflectagent.toml)")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="judgment cache folder (default: $REFLECTAGENT_CACHE_DIR or the user cache)")]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="-v for progress logs, -vv for debug")] = 0):
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:
        for noisy in ("LiteLLM", "litellm", "httpx", "dspy"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _cache(settings, cache_dir: Path | None, no_cache: bool):
    from reflectagent.cache import JudgmentCache

    return JudgmentCache(cache_dir or settings.cache_dir, enabled=settings.cache and not no_cache)


def _print_judgment(pair, judgment, show_analyses: bool) -> None:
    verdict = judgment.preference or f"none ({judgment.reason})"
    label = f"  label {pair.label}" if pair.label else ""
    mark = ""
    if pair.label in ("A", "B"):
        mark = "  ✓" if judgment.preference == pair.label else "  ✗"
    cached = "  [cached]" if judgment.steps and judgment.cache_hits == len(judgment.steps) else ""
    typer.echo(f"{pair.id or '-'}: verdict {verdict}{label}{mark}{cached}")
    for note in judgment.notes:
        typer.echo(f"    note: {note}")
    if show_analyses:
        for a in judgment.analyses:
            order = "B,A" if a.swapped else "A,B"
            verdict = a.preference or "unparsed"
            prob = f" p={a.probability:.2f}" if a.probability is not None else ""
            text = a.text.replace("\n", " ")[:160] if a.parsed else (a.error or "")[:160]
            typer.echo(f"    [{order}] -> {verdict}{prob}: {text}")
        for r in judgment.reflections:
            choice = f"analysis {r.more_reliable + 1}" if r.more_reliable is not None else "unparsed"
            text = r.text.replace("\n", " ")[:120] if r.parsed else (r.error or "")[:120]
            typer.echo(f"    reflect({r.first + 1} vs {r.second + 1}) -> {choice}: {text}")


@app.command()
def judge(
    file: Annotated[Optional[Path], typer.Argument(help="JSONL of pairs (prompt, response_a, response_b[, id, label, ...])")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="judge one pair given on the command line")] = None,
    a: Annotated[Optional[str], typer.Option("--a", help="response A, with --prompt")] = None,
    b: Annotated[Optional[str], typer.Option("--b", help="response B, with --prompt")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="judge the real pairs shipped with reflectagent")] = False,
    program_name: Annotated[str, typer.Option("--program", "-p", help="swap, genrm, genrm-both, genrm-prob, reflectrm or reflectrm-adaptive")] = "swap",
    load: Annotated[Optional[Path], typer.Option("--load", help="a compiled program saved with .save() (overrides --program)")] = None,
    backend_name: Annotated[Optional[str], typer.Option("--backend", "-b", help="backend name from the config (default: $REFLECTAGENT_BACKEND or 'embedded')")] = None,
    limit: Annotated[Optional[int], typer.Option(help="judge only the first N pairs")] = None,
    concurrency: Annotated[int, typer.Option(help="pairs judged at once")] = 8,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write every judgment as JSONL here")] = None,
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
    from reflectagent.backends import resolve_backend
    from reflectagent.cache import use_cache
    from reflectagent.config import ConfigError, load_settings
    from reflectagent.judge import RunInterrupted, judge_pairs
    from reflectagent.pairs import InvalidPair, Pair, read_pairs, sample_path

    sources = sum([file is not None, prompt is not None, sample])
    if sources != 1:
        _fail("give exactly one of: a JSONL FILE, --prompt with --a and --b, or --sample", 2)
    bad = []
    try:
        if prompt is not None:
            if a is None or b is None:
                _fail("--prompt needs both --a and --b", 2)
            pairs = [Pair(prompt=prompt, response_a=a, response_b=b, id="cli")]
        else:
            path = sample_path() if sample else file
            if not path.exists():
                _fail(f"no such file: {path}", 2)
            pairs, bad = read_pairs(path)
    except InvalidPair as exc:
        _fail(f"invalid pair: {exc}", 2)
    for line in bad:
        typer.secho(f"skipped {line}", fg="yellow", err=True)
    pairs = pairs[:limit] if limit is not None else pairs
    if not pairs:
        _fail("no valid pairs to judge", 2)

    try:
        settings = load_settings(config)
        started = time.perf_counter()
        lm = resolve_backend(backend_name, settings)
        ready_s = time.perf_counter() - started
    except (ConfigError, RuntimeError) as exc:
        _fail(str(exc))
    import dspy

    from reflectagent.programs import load_program, named_program

    try:
        program = load_program(load) if load else named_program(program_name)
    except ValueError as exc:
        _fail(str(exc), 2)
    started = time.perf_counter()
    try:
        with use_cache(_cache(settings, cache_dir, no_cache)), dspy.context(lm=lm):
            judgments = judge_pairs(program, pairs, concurrency=concurrency, progress=sys.stderr.isatty())
    except RunInterrupted as exc:
        _fail(str(exc))
    wall = time.perf_counter() - started

    for pair, judgment in zip(pairs, judgments):
        _print_judgment(pair, judgment, show_analyses=not quiet)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            for pair, judgment in zip(pairs, judgments):
                handle.write(json.dumps({"pair": pair.to_dict(), "judgment": judgment.to_dict()}, ensure_ascii=False) + "\n")

    reasons = Counter(j.reason for j in judgments if j.preference is None)
    labelled = [(p, j) for p, j in zip(pairs, judgments) if p.label in ("A", "B")]
    correct = sum(j.preference == p.label for p, j in labelled)
    steps = sum(len(j.steps) for j in judgments)
    hits = sum(j.cache_hits for j in judgments)
    whole_hits = sum(1 for j in judgments if j.steps and j.cache_hits == len(j.steps))
    calls = sum(j.lm_calls for j in judgments)
    usage = sum((j.usage for j in judgments), start=type(judgments[0].usage)())
    typer.echo("")
    typer.echo(f"program: {type(program).__name__} {program.options}")
    typer.echo(f"backend: {lm.backend.name} ({lm.backend.model} at {lm.backend.api_base or 'provider default'}); ready in {ready_s:.1f} s")
    typer.echo(f"pairs: {len(pairs)} judged, {len(bad)} bad lines skipped")
    typer.echo(f"verdicts: {len(judgments) - sum(reasons.values())}; no verdict: {sum(reasons.values())}"
               + (f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if reasons else ""))
    if labelled:
        typer.echo(f"accuracy on labelled pairs: {correct}/{len(labelled)} = {correct / len(labelled):.1%} (no verdict counts as wrong)")
    unparsed_steps = sum(1 for j in judgments for s in j.steps if not s.parsed)
    typer.echo(f"parse failures: {unparsed_steps} of {steps} steps")
    typer.echo(f"LM calls: {calls}; cache hits: {whole_hits} of {len(judgments)} judgments ({hits} of {steps} steps)")
    typer.echo(f"tokens: {usage.prompt_tokens} prompt, {usage.completion_tokens} completion")
    typer.echo(f"wall time: {wall:.1f} s; {len(judgments) / wall * 60:.1f} judgments per minute" if wall > 0 else "")


@app.command("eval")
def eval_command(
    data: Annotated[str, typer.Option("--data", "-d", help="benchmark files, comma-separated (JSONL, or datasets folders/files)")],
    programs: Annotated[str, typer.Option("--programs", "-p", help="comma-separated: swap, genrm, genrm-both, genrm-prob, reflectrm, reflectrm-adaptive")] = "genrm-both,reflectrm",
    backends: Annotated[str, typer.Option("--backends", "-b", help="comma-separated backend names")] = "embedded",
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder")] = Path("reports/latest"),
    limit: Annotated[Optional[int], typer.Option(help="at most N pairs per data file (after the split)")] = None,
    split: Annotated[str, typer.Option(help="all, train, dev or test (seeded, stratified by source)")] = "all",
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    concurrency: Annotated[int, typer.Option(help="judgments at once")] = 8,
    no_verdict: Annotated[str, typer.Option(help="how a missing verdict scores: 'wrong' (0) or 'half' (RewardBench)")] = "wrong",
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Compare programs x backends on benchmarks; write a report folder (markdown, JSON, plots).

    Interrupted, the same command resumes from the judgment cache and writes the same report.
    """
    from reflectagent.cache import use_cache
    from reflectagent.config import ConfigError, load_settings
    from reflectagent.eval import load_benchmark, run_eval, split_pairs, write_report
    from reflectagent.judge import RunInterrupted

    if split not in ("all", "train", "dev", "test"):
        _fail("--split is one of all, train, dev, test", 2)
    if no_verdict not in ("wrong", "half"):
        _fail("--no-verdict is 'wrong' or 'half'", 2)
    pairs, files = [], [f for f in data.split(",") if f]
    for name in files:
        if not Path(name).exists():
            _fail(f"no such data file: {name}", 2)
        loaded, bad = load_benchmark(name)
        for line in bad:
            typer.secho(f"skipped {line}", fg="yellow", err=True)
        chosen = loaded if split == "all" else split_pairs(loaded, seed=seed)[split]
        pairs += chosen[:limit] if limit is not None else chosen
    if not pairs:
        _fail("no valid pairs to evaluate", 2)
    try:
        settings = load_settings(config)
        with use_cache(_cache(settings, cache_dir, False)):
            results = run_eval(pairs, [p for p in programs.split(",") if p], [b for b in backends.split(",") if b],
                               settings=settings, concurrency=concurrency, no_verdict=no_verdict,
                               progress=sys.stderr.isatty())
    except (ConfigError, ValueError) as exc:
        _fail(str(exc), 2)
    except RunInterrupted as exc:
        _fail(str(exc))
    meta = {"data": files, "pairs": len(pairs), "split": split, "seed": seed, "limit": limit,
            "programs": programs.split(","), "backends": backends.split(","), "no_verdict": no_verdict}
    folder = write_report(results, out, meta)
    typer.echo((folder / "report.md").read_text().split("## Accuracy per category")[0])
    typer.echo(f"report: {folder}/report.md (JSON: report.json, plots: plots/)")


@app.command()
def compare(
    before: Annotated[Path, typer.Argument(help="report folder")],
    after: Annotated[Path, typer.Argument(help="report folder")],
):
    """Print each metric of two eval reports side by side, with the change."""
    from reflectagent.eval import compare as compare_reports

    for folder in (before, after):
        if not (folder / "report.json").exists():
            _fail(f"{folder} holds no report.json", 2)
    typer.echo(compare_reports(before, after))


finetune_app = typer.Typer(help="Distil judge traces into training data and fine-tune with LoRA.", no_args_is_help=True)
app.add_typer(finetune_app, name="finetune")
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _dataclass_flags(ctx: typer.Context, *kinds):
    """Parse the remaining arguments into the given dataclasses (transformers' HfArgumentParser)."""
    from transformers import HfArgumentParser

    if "--help" in ctx.args or "-h" in ctx.args:
        HfArgumentParser(kinds).print_help()
        raise typer.Exit(0)
    return HfArgumentParser(kinds).parse_args_into_dataclasses(args=ctx.args)


@finetune_app.command("data", context_settings=PASSTHROUGH)
def finetune_data(
    ctx: typer.Context,
    data: Annotated[str, typer.Option("--data", "-d", help="labelled pair files, comma-separated")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the datasets and the data card")] = Path("runs/data"),
    backend_name: Annotated[str, typer.Option("--backend", "-b", help="the teacher's backend (use temperature > 0)")] = "embedded",
    samples: Annotated[int, typer.Option(help="teacher analyses per pair (alternating orders)")] = 4,
    temperature: Annotated[float, typer.Option(help="temperature of samples after the first")] = 0.8,
    limit: Annotated[Optional[int], typer.Option(help="at most N pairs per file")] = None,
    concurrency: Annotated[int, typer.Option(help="pairs judged at once")] = 8,
    config: ConfigOpt = None,
    cache_dir: CacheDirOpt = None,
):
    """Run the teacher (ReflectRM) over labelled pairs and build the unified training data.

    More flags (DataConfig): --ratio, --rationalize, --fractions, --seed, --context_chars.
    """
    from reflectagent.cache import use_cache
    from reflectagent.config import load_settings
    from reflectagent.eval import load_benchmark
    from reflectagent.finetune import DataConfig, distil

    (data_config,) = _dataclass_flags(ctx, DataConfig)
    pairs = []
    for name in [f for f in data.split(",") if f]:
        loaded, bad = load_benchmark(name)
        for line in bad:
            typer.secho(f"skipped {line}", fg="yellow", err=True)
        pairs += loaded[:limit] if limit is not None else loaded
    settings = load_settings(config)
    with use_cache(_cache(settings, cache_dir, False)):
        built = distil(pairs, backend_name, settings, out, data_config, samples=samples, temperature=temperature,
                       concurrency=concurrency, progress=sys.stderr.isatty())
    typer.echo(json.dumps(built.stats, indent=2))
    dpo_note = f", {out}/dpo (STaR-DPO)" if (out / "dpo").exists() else " (no STaR-DPO triples: no order had a right and a wrong analysis)"
    typer.echo(f"datasets: {out}/unified (SFT){dpo_note}; card: {out}/data_card.json")


@finetune_app.command("train", context_settings=PASSTHROUGH, add_help_option=False)
def finetune_train(ctx: typer.Context):
    """LoRA fine-tuning on the unified data (flags: SFTJobConfig, e.g. --data runs/data/unified --max_steps 200)."""
    from reflectagent.finetune import SFTJobConfig, train_sft

    (job,) = _dataclass_flags(ctx, SFTJobConfig)
    adapter = train_sft(job)
    typer.echo(f"adapter: {adapter}\nserve it: reflectagent serve --lora judge={adapter}")


@finetune_app.command("run")
def finetune_run(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="loop config (YAML/TOML): see LoopConfig")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (overrides output_dir)")] = None,
    settings_file: Annotated[Optional[Path], typer.Option("--settings", help="backend settings file (the teacher's backend)")] = None,
    cache_dir: CacheDirOpt = None,
):
    """The whole loop: teacher traces -> data -> LoRA (response-only, unified) + Bradley-Terry -> serve -> eval report.

    Re-running the same command resumes: finished stages are skipped, judged steps come from the cache.
    """
    from reflectagent.cache import use_cache
    from reflectagent.config import ConfigError, load_settings
    from reflectagent.finetune.loop import Loop
    from reflectagent.finetune.loop_config import load_loop_config

    try:
        loop_config = load_loop_config(config_file, **({"output_dir": str(out)} if out else {}))
    except ConfigError as exc:
        _fail(str(exc), 2)
    settings = load_settings(settings_file)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop its servers on `kill`, as on Ctrl-C
    with use_cache(_cache(settings, cache_dir, False)):
        report = Loop(loop_config, settings, progress=sys.stderr.isatty()).run()
    typer.echo(report.read_text())
    typer.echo(f"report: {report}")


@finetune_app.command("merge")
def finetune_merge(
    adapter: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the merged model folder")],
    base_model: Annotated[str, typer.Option("--base-model", help="'embedded' or the adapter's base model folder")] = "embedded",
):
    """Merge a LoRA adapter into its base model: a full folder vLLM serves as a plain model (faster on CPU)."""
    from reflectagent.finetune.export import merge_adapter

    try:
        typer.echo(merge_adapter(adapter, out, base_model))
    except FileNotFoundError as exc:
        _fail(str(exc), 2)


@finetune_app.command("dpo", context_settings=PASSTHROUGH, add_help_option=False)
def finetune_dpo(ctx: typer.Context):
    """STaR-DPO on top of an SFT adapter (flags: DPOJobConfig, e.g. --data runs/data/dpo --sft_adapter runs/sft/adapter)."""
    from reflectagent.finetune.dpo import DPOJobConfig, train_dpo

    (job,) = _dataclass_flags(ctx, DPOJobConfig)
    merged = train_dpo(job)
    typer.echo(f"merged model: {merged}\nserve it: reflectagent serve {merged}")


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="'embedded' (packaged SmolLM2), a model folder, or a hub id")] = "embedded",
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA adapter to serve, NAME=DIR (repeatable)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default: a free one)")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="served model name (default: 'embedded' or the folder name)")] = None,
    max_model_len: Annotated[int, typer.Option(help="context length")] = 2048,
    max_lora_rank: Annotated[int, typer.Option(help="largest LoRA rank to accept")] = 64,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the server to answer")] = 600,
):
    """Serve a model (and LoRA adapters) with vLLM's OpenAI-compatible server until Ctrl-C."""
    from reflectagent.backends import EMBEDDED_SERVED_NAME, state_file
    from reflectagent.models import ModelPreparationError, prepare_model
    from reflectagent.server import ServerError, ServerSpec, VLLMServer

    loras = {}
    for item in lora or []:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            _fail(f"--lora takes NAME=DIR, got {item!r}", 2)
        if not Path(path).is_dir():
            _fail(f"LoRA folder not found: {path}", 2)
        loras[key] = str(Path(path).resolve())
    try:
        folder = prepare_model(model)
    except ModelPreparationError as exc:
        _fail(str(exc))
    embedded = model == "embedded"
    served = name or (EMBEDDED_SERVED_NAME if embedded else Path(folder).name)
    spec = ServerSpec(model_dir=str(folder), served_name=served, loras=loras, port=port,
                      max_model_len=max_model_len, max_lora_rank=max_lora_rank)
    server = VLLMServer(spec)
    # Ctrl-C and SIGTERM both stop the server, even where SIGINT was ignored (nohup, `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        starting = time.perf_counter()
        url = server.start(timeout_s=timeout)
        ready_s = time.perf_counter() - starting
        if embedded:
            state_file().parent.mkdir(parents=True, exist_ok=True)
            state_file().write_text(json.dumps({"url": url, "loras": loras}))
        typer.echo(f"serving {served} ({folder}) at {url}")
        typer.echo(f"ready in {ready_s:.0f} s")
        for key in loras:
            typer.echo(f"  adapter {key}: model name '{key}' (LiteLLM: hosted_vllm/{key})")
        typer.echo(f"LiteLLM model string: hosted_vllm/{served}, api_base {url}. Ctrl-C stops the server.")
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        _fail(f"the server exited; log tail:\n{server.log_tail()}")
    except ServerError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("stopping the server")
    finally:
        server.stop()
        if embedded and state_file().exists() and json.loads(state_file().read_text()).get("url") == server.url:
            state_file().unlink()  # only our own: another `serve` may have replaced it


@models_app.command("prepare")
def models_prepare(
    source: Annotated[str, typer.Argument(help="'embedded', a local model folder, or a hub id")] = "embedded",
    force: Annotated[bool, typer.Option(help="convert again even if the folder exists")] = False,
):
    """Make a Hugging Face model folder (the embedded GGUF is converted once and reused)."""
    from reflectagent.models import ModelPreparationError, prepare_model

    try:
        typer.echo(prepare_model(source, force=force))
    except ModelPreparationError as exc:
        _fail(str(exc))


@cache_app.command("info")
def cache_info(config: ConfigOpt = None, cache_dir: CacheDirOpt = None):
    """Where the judgment cache is and how much it holds."""
    from reflectagent.config import load_settings

    info = _cache(load_settings(config), cache_dir, False).info()
    typer.echo(f"directory: {info['directory']}\nentries: {info['entries']}\nsize: {info['bytes'] / 1e6:.1f} MB")


@cache_app.command("clear")
def cache_clear(config: ConfigOpt = None, cache_dir: CacheDirOpt = None):
    """Delete every cached judgment step."""
    from reflectagent.config import load_settings

    removed = _cache(load_settings(config), cache_dir, False).clear()
    typer.echo(f"removed {removed} entries")


if __name__ == "__main__":  # pragma: no cover
    app()
