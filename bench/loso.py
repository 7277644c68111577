"""Does a trained judge judge what it never saw? Leave one source out, over the five human-labelled sets.

    .venv/bin/python bench/loso.py [--target verdict] [--preset qwen2.5-coder-0.5b] [--pairs 480] [--folds all]
        [--out bench/results/loso-verdict-0.5b]
    .venv/bin/python bench/loso.py --target rationale --folds teacher-only   # after --target verdict on that fold

A judge trained and tested on the same sources measures how well it learnt those sources: the shipped
preset got 72.5% on its five training sources' test pairs and chance on public benchmarks it never saw.
This bench holds each of the five sets in ../shared/data out in turn (a *fold*) and trains on the rest:

- **train**: a mix of the teacher file's GPT-4-turbo judgments (its preference as the label) and the four
  other sets' train splits (seed 0), less every pair whose prompt is in the held-out set (any split), in
  any set's dev or test split, or among the pairs shipped for the demo; usable pairs only (labelled A or B,
  two distinct non-empty responses, prompt and responses within ``--max-chars``); one pair a prompt
  (``one_per_prompt``); then ``--pairs`` of them taken in turn from the five groups (teacher and four sets:
  ``balanced``), each in both orders, so the position of the better response carries no signal.
- **held out**: the held-out set's first quality-bench sample (``common.source_test_pairs``: its test
  split, the same 32 pairs ``bench/judge_quality.py`` judged), so the untrained base models and today's
  preset are already judged on exactly these pairs (their committed reports: no LM call).
- **in distribution**: the same fold's model on the other four sets' first samples (128 pairs).

``--folds teacher-only`` is one larger fold: every set held out, a model trained on the teacher file alone (less
every pair sharing a prompt with any of the five sets, any split), judged on all 160 held-out pairs. It costs one
training a target instead of five (the issue allows fewer, larger folds on CPU); its reports are written to
``bench/results/loso-TARGET-SIZE-teacher-only``.

The headline is the mean over the five folds' held-out pairs (160, so it is their pooled accuracy), with a
bootstrap interval and paired differences against today's preset (``qwen2.5-coder-1.5b-verdict``,
direct-prob, float32) and the untrained base on the same pairs. Today's preset was trained on all five
sets' train splits, so its figure here is in-distribution for it: a strict baseline.

Targets (what the fold's model is trained to write, and the program that judges with it):
- ``verdict``: the verdict token alone (``Prefer`` rows, LoRA; ``direct-prob``), today's preset's recipe. On this
  CPU a 0.5B took 67-88 s a step of 8 rows: about 2.3 hours a fold of 480 pairs.
- ``rationale``: GenRM's rationale then verdict (``Analyze`` rows, LoRA; ``genrm-prob``), the rationale being the
  teacher file's own GPT-4-turbo analysis of the pair, shown in both orders (``finetune.teacher_data``: the teacher's
  explanation stands in for GenRM's rationalisation, no LM call). Only the teacher has analyses, so this target runs
  on the ``teacher-only`` fold, and the verdict target trained on the same fold is "trained with analyses vs without":
  same model, pairs, settings and held-out pairs.
- ``verdict-head``: the same verdict, adapted by a linear head on the frozen model's hidden state at the verdict
  slot (``reflectagent.finetune.verdict_head``), folded into the LM head's "A" and "B" rows. Features are computed
  once, one forward pass a row (``OUT/features``, committed: a new machine resumes), for a pool of ``--pairs``
  pairs drawn as above from every set's train split and the teacher, each in one order (drawn from its id, so
  positions stay balanced), and for the test pairs in both orders; each fold then fits on the pool less its
  held-out set, with its L2 weight chosen on 10% of the fold's training prompts, and is scored from the features
  (the order-averaged P(A), as ``direct-prob`` computes it). ``--serve-check SOURCE`` folds that fold's head into
  a model folder and judges its held-out pairs through vLLM, to show the served judge agrees.
- ``analysis-head``: the same head, read at ``genrm-prob``'s verdict slot, after the model's own analysis (GenRM's
  rationale then verdict; judged by ``genrm-prob``). The untrained model writes one analysis for each pool row (its
  one order) and each test pair in both orders (vLLM, bfloat16, cached in ``OUT/cache``, raw outputs in
  ``OUT/analyses.json``); the features are read after them. Each fold also refits the ``verdict-head`` target on
  exactly the same pool rows from that target's committed features (``fold/without_analyses.json``), so "trained with
  analyses vs without" is a paired difference on the same model and pairs. ``--pairs`` may be smaller than the
  verdict head's (the pool is a prefix of the larger one: ``balanced`` takes the groups in turn).

Nothing is chosen by looking at a test pair or a held-out set: the mix, its size and the training
settings are fixed here before the run; the dev rows (10% of the fold's training prompts) give the only
feedback, an eval loss. Each fold trains in its own process with checkpoints every ``--save-steps``
(``OUT/fold-SOURCE/sft``, resumed when run again; commit the latest checkpoint to resume on another
machine); the adapter is copied to ``OUT/fold-SOURCE/adapter`` last and committed; merged models are
rebuilt from it into the user cache. Every judgment is cached in ``OUT/cache`` (committed): a warm re-run
makes no LM call and starts no server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from common import SOURCES, TEACHER, in_own_process, load_source, log_to_stderr, source_test_pairs
from provenance import provenance

from reflectagent.backends import fingerprint, resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.eval import EvalRun, Record, paired_difference, run_eval, summarize
from reflectagent.eval.report import format_ci as interval
from reflectagent.finetune import DataConfig, SFTJobConfig, distil_file, label_data, teacher_data, train_sft
from reflectagent.finetune.selection import balanced, one_per_prompt, one_per_prompt_length_balanced, usable
from reflectagent.finetune.verdict_head import (
    FeatureStore,
    VerdictHead,
    VerdictRow,
    extract,
    fit_head,
    shown_orders,
    verdict_direction,
    verdict_rows,
    write_head,
)
from reflectagent.models import is_prepared, merge_lora, prepare_model, read_source
from reflectagent.pairs import Pair, sample_pairs
from reflectagent.paths import cache_root
from reflectagent.presets import prepared_sha256
from reflectagent.programs import named_program
from reflectagent.splits import prompt_disjoint, split_pairs, stable_fraction
from reflectagent.teacher import read_teacher

TARGETS = {
    "verdict": "direct-prob",
    "rationale": "genrm-prob",
    "reflectrm": "reflectrm-prob",
    "verdict-head": "direct-prob",
    "analysis-head": "genrm-prob",
}  # target -> the program that judges with it
WITHOUT = {
    "analysis-head": "the verdict-head target refitted on the same pool rows, same model",
    "rationale": "the verdict target trained on the same pairs, same model and settings",
    "reflectrm": "the verdict target trained on the same pairs, same model and settings",
}  # how each target with analyses is compared with the same training without them
TEACHER_TARGETS = ("rationale", "reflectrm")  # trained on the teacher file's analyses: the teacher-only fold
WITHOUT_REFLECTION = "genrm-prob"  # the reflectrm target's model judged without reflecting
ADAPTIVE = "reflectrm-adaptive-prob"  # ... and reflecting only where its analyses disagree: what skipping costs
BY_SET_NAMES = {
    "trained": "(this target)",
    "base": "(the untrained base, same program)",
    "preset": "(today's preset, direct-prob, float32)",
    "without_analyses": "(the same training without analyses)",
    "without_reflection": "(the same model without reflection)",
}
WITHOUT_RUNS = ("without_analyses", "without_reflection")  # paired comparisons, where a target has them
TEACHER_ONLY = "teacher-only"  # the fold that holds out all five sets: trained on the teacher file alone
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PER_SOURCE = 32  # the quality bench's first sample
TEST_MAX_CHARS = 2500  # ... and its length limit
PRESET_REPORT = Path("bench/results/quality-1.5b-verdict/report.json")  # today's preset, direct-prob, float32
BASE_REPORT = Path("bench/results/quality-1.5b/report.json")  # the untrained 1.5B, every program


def held_sets(fold: str) -> tuple[str, ...]:
    """The sets a fold holds out: one, or all five for :data:`TEACHER_ONLY`."""
    return tuple(SOURCES) if fold == TEACHER_ONLY else (fold,)


def training_pool(fold: str | None, n: int, max_chars: int, seed: int, balance_length: bool = False) -> list[Pair]:
    """Teacher pairs and the sets' train splits (all but the fold's held-out sets, and nothing sharing a prompt with
    them or with any evaluation pair), usable, one a prompt (chosen so that the longer response wins in half of
    them, with ``balance_length``), ``n`` taken in turn from each group."""
    held = held_sets(fold) if fold else ()
    loaded = {source: load_source(source) for source in SOURCES}
    splits = {source: split_pairs(pairs, seed=0) for source, pairs in loaded.items()}
    evaluation = [p for split in splits.values() for p in split["dev"] + split["test"]]  # prompts recur across sets
    evaluation += [p for source in held for p in loaded[source]] + sample_pairs()
    teacher = [judgment.pair for judgment in read_teacher(TEACHER)[0]]
    candidates = teacher + [p for source in SOURCES if source not in held for p in splits[source]["train"]]
    candidates = [p for p in prompt_disjoint(candidates, evaluation) if usable(p, max_chars)]
    one_each = one_per_prompt_length_balanced if balance_length else one_per_prompt
    return balanced(one_each(candidates, seed), n, seed)


def held_out_pairs(fold: str) -> list[Pair]:
    return [p for source in held_sets(fold) for p in source_test_pairs(source, PER_SOURCE, TEST_MAX_CHARS)]


def fold_test_pairs(fold: str) -> list[Pair]:
    """Held-out pairs first, then the training sets' (in distribution; none for the teacher-only fold)."""
    return held_out_pairs(fold) + [p for s in SOURCES if s not in held_sets(fold) for p in held_out_pairs(s)]


def training_key(args: argparse.Namespace, held_out: str, chosen: list[Pair]) -> dict:
    """What a fold's adapter is trained from: another setting or another mix must not reuse it."""
    return {
        "target": args.target,
        "preset": args.preset,
        "held_out": held_out,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "max_length": args.max_length,
        **({"balance_length": True} if args.balance_length else {}),  # absent from the runs made before it
        **({"reflections": "teacher"} if args.target == "reflectrm" else {}),
        "pairs": hashlib.sha256("\n".join(sorted(p.id for p in chosen)).encode()).hexdigest()[:16],
    }


def train(args: argparse.Namespace, held_out: str, chosen: list[Pair]) -> None:
    """Verdict rows and LoRA SFT, resumed from the fold's checkpoints; the adapter copied to ``fold/adapter`` last."""
    log_to_stderr()
    fold, key = args.out / f"fold-{held_out}", training_key(args, held_out, chosen)
    run = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    data_dir = cache_root() / "loso-data" / run
    settings = Settings(backends={"student": BackendConfig(model="embedded", model_path=args.preset)})
    card = {"held_out": list(held_sets(held_out)), "pairs_by_source": dict(Counter(p.source for p in chosen))}
    wanted = {p.id for p in chosen}
    judgments = [j for j in read_teacher(TEACHER)[0] if j.pair.id in wanted] if args.target in TEACHER_TARGETS else []
    if args.target == "rationale":  # the teacher's own analyses, in both orders, then its verdict
        teacher_data(judgments, "student", settings, data_dir, DataConfig(fractions="0.9,0.1,0"), card)
    elif args.target == "reflectrm":
        # ... 4:1 with reflections, from the teacher's analysis, on the student's wrong ones
        settings = Settings(
            backends={
                "student": BackendConfig(model="embedded", model_path=args.preset, dtype="bfloat16", timeout_s=1800)
            }
        )
        with use_cache(JudgmentCache(args.out / "cache")):
            distil_file(
                judgments,
                "student",
                settings,
                data_dir,
                DataConfig(fractions="0.9,0.1,0", ratio=4.0),
                samples=2,
                concurrency=args.concurrency,
                progress=sys.stderr.isatty(),
                reflections="teacher",  # the untrained 0.5B's rationalised reflections were the letter "A"
            )
        fold.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / "traces.jsonl", fold / "traces.jsonl")  # the student's analyses, for reading
    else:
        card["labels"] = "the teacher's preference (teacher rows) and the sets' own labels (train splits, seed 0)"
        label_data(chosen, "student", settings, data_dir, DataConfig(fractions="0.9,0.1,0"), card)
    job = SFTJobConfig(
        base_model=args.preset,
        data=str(data_dir / "unified"),
        output_dir=str(fold / "sft"),
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        per_device_batch=1,
        gradient_accumulation=8,
        save_steps=args.save_steps,
        eval_steps=args.save_steps,
    )
    trained = train_sft(job)
    adapter = fold / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (fold / "training.json").write_text(json.dumps(key, indent=1))
    for name in ("run_card.json", "training_curve.png"):
        shutil.copy(Path(job.output_dir) / name, fold / name)
    shutil.copy(data_dir / "data_card.json", fold / "data_card.json")
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the base's tokenizer is used with it
        shutil.copy(trained / name, adapter / f"{name}.partial")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / f"{name}.partial").rename(adapter / name)


def merged_source(args: argparse.Namespace, adapter: Path) -> dict:
    """The merged folder's record: the judgment cache names it by the base's hash and the adapter's fingerprint."""
    return {
        "name": f"{args.preset} + {adapter.parent.name}",
        "base_sha256": prepared_sha256(prepare_model(args.preset)),
        "adapter_fingerprint": fingerprint(adapter),
        "dtype": "float32",
        "max_model_len": 4096,
    }


def merge(args: argparse.Namespace, adapter: Path, merged: Path) -> None:
    log_to_stderr()
    merge_lora(prepare_model(args.preset), adapter, merged, "float32", source=merged_source(args, adapter))


def judge(
    args: argparse.Namespace, model: str, pairs: list[Pair], label: str, path: Path, program: str | None = None
) -> None:
    """One model's verdicts on ``pairs``, kept in ``path`` (a server starts only for uncached steps, and dies with
    this process, so folds do not pile servers up)."""
    log_to_stderr()
    settings = Settings(
        backends={
            "judge": BackendConfig(
                model="embedded", model_path=model, dtype="float32", context_tokens=4096, timeout_s=1800
            )
        }
    )
    program = program or TARGETS[args.target]
    with use_cache(JudgmentCache(args.out / "cache")):
        [result] = run_eval(
            pairs,
            [EvalRun(program, label, named_program(program), resolve_backend("judge", settings))],
            concurrency=args.concurrency,
            progress=sys.stderr.isatty(),
        )
    path.write_text(json.dumps({**result.to_dict(), "run": result.run_dict()}))


def records(path: Path, pairs: list[Pair], program: str = "direct-prob") -> list[Record]:
    """The records of ``pairs`` in a saved run (:func:`judge`), or in a report's run of ``program``."""
    data = json.loads(path.read_text())
    if "runs" in data:  # a report.json: today's preset or the untrained 1.5B
        data = next(run for run in data["runs"] if run["program"] == program)
    wanted = {p.id for p in pairs}
    return [r for r in map(Record.from_dict, data["records"]) if r.pair_id in wanted]


def steps_per_verdict(got: list[Record]) -> float:
    """LM calls (made or cached) a verdict: each record is one pair judged in both presentations."""
    return sum(r.steps for r in got) / (2 * len(got)) if got else 0.0


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def points(value: float | None, ci) -> str:
    return (
        "-"
        if value is None
        else f"{100 * value:+.1f} pts" + ("" if ci is None else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]")
    )


def by_set(fold: str, runs: dict[str, list[Record]]) -> dict[str, dict]:
    """Each held-out set's accuracy in each run, where a fold holds out more than one (the teacher-only fold)."""
    sets = held_sets(fold)
    if len(sets) == 1:
        return {}
    ids = {source: {p.id for p in held_out_pairs(source)} for source in sets}
    return {
        source: {name: summarize([r for r in got if r.pair_id in ids[source]]).accuracy for name, got in runs.items()}
        for source in sets
    }


def report(args: argparse.Namespace, folds: list[str]) -> dict:
    """Per fold and pooled: held-out and in-distribution accuracy, and paired differences against the baselines."""
    rows, pooled = (
        [],
        {name: [] for name in ("trained", "in_distribution", "preset", "base", "base_1.5b", "adaptive", *WITHOUT_RUNS)},
    )
    for held_out in folds:
        fold = args.out / f"fold-{held_out}"
        held = held_out_pairs(held_out)
        others = fold_test_pairs(held_out)[len(held) :]
        mine = records(fold / "judged.json", held)
        inside = records(fold / "judged.json", others)
        base = records(args.out / "base.json", held)
        preset, base15 = records(PRESET_REPORT, held), records(BASE_REPORT, held)
        without = {name: records(path, held) if path.exists() else [] for name, path in without_runs(args, held_out)}
        adaptive = records(fold / "adaptive.json", held) if (fold / "adaptive.json").exists() else []
        for name, got in (
            ("trained", mine),
            ("in_distribution", inside),
            ("preset", preset),
            ("base", base),
            ("base_1.5b", base15),
            ("adaptive", adaptive),
            *without.items(),
        ):
            pooled[name] += got
        rows.append(
            {
                "held_out": held_out,
                "pairs": len(held),
                "trained": summarize(mine).accuracy,
                "in_distribution": summarize(inside).accuracy,
                "preset": summarize(preset).accuracy,
                "base": summarize(base).accuracy,
                "base_1.5b": summarize(base15).accuracy,
                "vs_preset": paired_difference(mine, preset),
                "vs_base": paired_difference(mine, base),
                "card": json.loads((fold / "run_card.json").read_text()),
                "by_set": by_set(
                    held_out,
                    {"trained": mine, "base": base, "preset": preset, **{k: v for k, v in without.items() if v}},
                ),
            }
        )
    overall = {name: summarize(got).accuracy for name, got in pooled.items()}
    paired = {
        "vs_preset": paired_difference(pooled["trained"], pooled["preset"]),
        "vs_base": paired_difference(pooled["trained"], pooled["base"]),
        "vs_base_1.5b": paired_difference(pooled["trained"], pooled["base_1.5b"]),
        **{f"vs_{name}": paired_difference(pooled["trained"], pooled[name]) for name in WITHOUT_RUNS},
        "adaptive_vs_trained": paired_difference(pooled["adaptive"], pooled["trained"]),
    }
    calls = {name: steps_per_verdict(pooled[name]) for name in ("trained", "adaptive")}
    return {"rows": rows, "overall": overall, "paired": paired, "lm_calls_per_verdict": calls}


def markdown(args: argparse.Namespace, summary: dict, meta: dict) -> str:
    program = TARGETS[args.target]
    lines = [
        f"# Leave one source out: {args.target} target on {args.preset}, judged by {program}",
        "",
        f"Run: `{meta['command']}` at {meta['commit']} ({meta['cpu_cores']} cores). Both presentations of each pair; "
        "no verdict counts as wrong. "
        + (
            "Held out: all five sets' first quality-bench samples (32 test pairs each); the model was trained on the "
            "teacher file alone, less every pair sharing a prompt with any of the five sets (any split)."
            if summary["rows"] and summary["rows"][0]["held_out"] == TEACHER_ONLY
            else "Held out: each set's first quality-bench sample (32 test pairs), never trained on, nor any pair "
            "sharing a prompt with it. In distribution: the same fold's model on the other four sets' samples."
        ),
        "",
        f"| held out | pairs | trained, held out | trained, in distribution | untrained {args.preset} | "
        "today's preset (in-distribution for it) | trained - preset | trained - untrained | train rows | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        card = row["card"]
        lines.append(
            f"| {row['held_out']} | {row['pairs']} | {percent(row['trained'].value)}{interval(row['trained'].ci)} | "
            f"{percent(row['in_distribution'].value)} | {percent(row['base'].value)} | {percent(row['preset'].value)} | "
            f"{points(row['vs_preset'].value, row['vs_preset'].ci)} | {points(row['vs_base'].value, row['vs_base'].ci)} | "
            f"{card['train_rows']} | {card['seconds'] / 60:.0f} |"
        )
    for row in summary["rows"]:
        if row["by_set"]:
            runs = list(next(iter(row["by_set"].values())))
            lines += [
                "",
                f"Fold {row['held_out']}, by held-out set (32 pairs each): "
                + ", ".join(f"{name} {BY_SET_NAMES.get(name, name)}" for name in runs)
                + ".",
                "",
                "| set | " + " | ".join(runs) + " |",
                "|---|" + "---|" * len(runs),
            ]
            lines += [
                f"| {source} | " + " | ".join(percent(got[name].value) for name in runs) + " |"
                for source, got in row["by_set"].items()
            ]
    o, p = summary["overall"], summary["paired"]
    lines += [
        "",
        f"**Mean over the folds' held-out pairs: {percent(o['trained'].value)}{interval(o['trained'].ci)}** "
        f"(in distribution: {percent(o['in_distribution'].value)}{interval(o['in_distribution'].ci)}).",
        "",
        f"- Paired against today's preset on the same pairs: {points(p['vs_preset'].value, p['vs_preset'].ci)} "
        f"(preset {percent(o['preset'].value)}{interval(o['preset'].ci)}).",
        f"- Paired against the untrained {args.preset}: {points(p['vs_base'].value, p['vs_base'].ci)} "
        f"(untrained {percent(o['base'].value)}).",
        f"- Paired against the untrained 1.5B (direct-prob, float32): {points(p['vs_base_1.5b'].value, p['vs_base_1.5b'].ci)} "
        f"(untrained 1.5B {percent(o['base_1.5b'].value)}).",
    ]
    if o["without_analyses"].n:
        lines.append(
            f"- Trained with analyses vs without ({WITHOUT[args.target]}): "
            f"{points(p['vs_without_analyses'].value, p['vs_without_analyses'].ci)} "
            f"(without {percent(o['without_analyses'].value)}{interval(o['without_analyses'].ci)})."
        )
    if o["without_reflection"].n:
        lines.append(
            f"- Reflection vs none (the same model judged by {WITHOUT_REFLECTION}, its analyses without the reflection "
            f"step): {points(p['vs_without_reflection'].value, p['vs_without_reflection'].ci)} "
            f"(without {percent(o['without_reflection'].value)}{interval(o['without_reflection'].ci)})."
        )
    if o["adaptive"].n:
        calls = summary["lm_calls_per_verdict"]
        lines.append(
            f"- Adaptive ({ADAPTIVE}: the reflection step skipped where every analysis already agrees): "
            f"{percent(o['adaptive'].value)}{interval(o['adaptive'].ci)}, "
            f"{points(p['adaptive_vs_trained'].value, p['adaptive_vs_trained'].ci)} against {program}, at "
            f"{calls['adaptive']:.2f} LM calls a verdict against {calls['trained']:.2f}."
        )
    lines.append("")
    return "\n".join(lines)


def without_runs(args: argparse.Namespace, fold: str) -> list[tuple[str, Path]]:
    """The fold's pairs judged without what this target adds. Without analyses: the analysis head's refitted verdict
    head, or for the teacher targets the verdict target trained on the same pairs (its run with the same settings).
    Without reflection: the reflectrm target's own model judged by genrm-prob."""
    if args.target in TEACHER_TARGETS:
        plain = default_out("verdict", args.preset, [fold], args.balance_length) / f"fold-{fold}" / "judged.json"
    else:
        plain = args.out / f"fold-{fold}" / "without_analyses.json"
    return [("without_analyses", plain), ("without_reflection", args.out / f"fold-{fold}" / "without_reflection.json")]


def default_out(target: str, preset: str, folds: list[str], balance_length: bool = False) -> Path:
    suffix = (f"-{TEACHER_ONLY}" if folds == [TEACHER_ONLY] else "") + ("-length-balanced" if balance_length else "")
    return Path(f"bench/results/loso-{target}-{preset.removeprefix('qwen2.5-coder-')}{suffix}")


def input_budget(args: argparse.Namespace):
    """The budget the served model's prompts are cut to, so the features are of the very prompts it is served."""
    settings = Settings(
        backends={
            "judge": BackendConfig(model="embedded", model_path=args.preset, dtype="float32", context_tokens=4096)
        }
    )
    return resolve_backend("judge", settings).backend.input_budget()


def extract_stage(model_dir: str, rows: list[VerdictRow], folder: Path) -> None:
    log_to_stderr()
    extract(model_dir, rows, FeatureStore(folder), progress=sys.stderr.isatty())


def head_records(pairs: list[Pair], rows: list[VerdictRow], logits: np.ndarray) -> list[Record]:
    """The probability programs' records from logit differences: the order-averaged P(A), the same in both
    presentations; a pair with a presentation that has no row (an analysis without a verdict) gets none, as
    ``genrm-prob`` gives none."""
    p_shown_a = {(row.pair_id, row.swapped): 1 / (1 + np.exp(-logit)) for row, logit in zip(rows, logits)}
    made = []
    for pair in pairs:
        shown = p_shown_a.get((pair.id, False)), p_shown_a.get((pair.id, True))
        p_a = None if None in shown else float((shown[0] + 1 - shown[1]) / 2)
        verdict = None if p_a is None or p_a == 0.5 else "A" if p_a > 0.5 else "B"
        made.append(
            Record(
                pair_id=pair.id,
                category=pair.category or "",
                source=pair.source or "",
                label=pair.label,
                verdicts=(verdict, verdict),
                reasons=(None, None) if verdict else ("unparsed",) * 2 if p_a is None else ("tie", "tie"),
                steps=4,
                unparsed_steps=0,
                lm_calls=0,
                prompt_tokens=0,
                completion_tokens=0,
                probabilities=(p_a, p_a),
            )
        )
    return made


def analyses_stage(args: argparse.Namespace, shown: list[tuple[Pair, bool]], path: Path) -> None:
    """The untrained model's own analyses (``genrm-prob``'s step, one presentation each), served by vLLM in bfloat16
    (1.8x float32's speed here), every step cached in ``OUT/cache``; their raw outputs kept in ``path``."""
    import dspy

    from reflectagent.judge import judge_pairs
    from reflectagent.programs.genrm import GenRM

    log_to_stderr()
    settings = Settings(
        backends={
            "writer": BackendConfig(
                model="embedded", model_path=args.preset, dtype="bfloat16", context_tokens=4096, timeout_s=1800
            )
        }
    )
    with use_cache(JudgmentCache(args.out / "cache")), dspy.context(lm=resolve_backend("writer", settings)):
        judgments = judge_pairs(
            GenRM(both_orders=False, decision="probability"),
            [pair.swapped() if swapped else pair for pair, swapped in shown],
            concurrency=args.concurrency,
            progress=sys.stderr.isatty(),
        )
    raw = {
        f"{pair.id}|{int(swapped)}": j.analyses[0].raw if j.analyses[0].parsed else None
        for (pair, swapped), j in zip(shown, judgments)
    }
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(raw))
    partial.rename(path)


def own_analyses(args: argparse.Namespace, every_test: list[Pair], pool: list[Pair]) -> dict[tuple[str, bool], str]:
    """(pair id, swapped) -> the raw analysis, for the test pairs in both orders and the pool in its one order."""
    shown = [(p, s) for p in every_test for s in (False, True)] + [(p, s) for p in pool for s in shown_orders(p, "one")]
    path = args.out / "analyses.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    if any(f"{p.id}|{int(s)}" not in kept for p, s in shown):
        in_own_process(analyses_stage, args, shown, path)
        kept = json.loads(path.read_text())
    return {(key.rsplit("|", 1)[0], key.endswith("|1")): raw for key, raw in kept.items()}


def fold_rows(pool: list[Pair], rows: list[VerdictRow], held_out: str) -> list[VerdictRow]:
    """The pool's rows a fold may train on: none from the held-out set, none sharing a prompt with it."""
    held_prompts = {p.prompt for p in load_source(held_out)}
    held_name = held_out_pairs(held_out)[0].source
    by_id = {p.id: p for p in pool}
    return [r for r in rows if by_id[r.pair_id].source != held_name and by_id[r.pair_id].prompt not in held_prompts]


def fit_fold(store: FeatureStore, mine: list[VerdictRow], base: np.ndarray) -> tuple[VerdictHead, dict]:
    """A fold's head: its L2 weight chosen on 10% of its rows' prompts (dev log loss), then fitted on all of them."""
    dev = [r for r in mine if stable_fraction("head-dev", r.pair_id) < 0.1]
    train = [r for r in mine if stable_fraction("head-dev", r.pair_id) >= 0.1]
    x, y = store.get([r.key for r in train]), np.array([r.label for r in train])
    dev_x, dev_y = store.get([r.key for r in dev]), np.array([r.label for r in dev])

    def dev_loss(l2: float) -> float:
        logit = fit_head(x, base, y, l2).logit(dev_x, base)
        return float(np.mean(np.logaddexp(0, -logit) * dev_y + np.logaddexp(0, logit) * (1 - dev_y)))

    losses = {l2: dev_loss(l2) for l2 in L2_GRID}
    l2 = min(losses, key=losses.get)
    head = fit_head(store.get([r.key for r in mine]), base, np.array([r.label for r in mine]), l2)
    return head, {"l2": l2, "dev_loss_by_l2": {str(k): v for k, v in losses.items()}, "dev_rows": len(dev)}


def head_main(args: argparse.Namespace, folds: list[str]) -> None:
    """Features once for the pool and the test pairs, then each fold's head fitted and scored from them.

    ``analysis-head``: the same, at the verdict slot after the model's own analysis; and, for the paired comparison
    "trained with analyses vs without", each fold's ``verdict-head`` refitted on exactly the same pool rows from
    that target's committed features (``OUT/../loso-verdict-head-SIZE/features``)."""
    import time

    from transformers import AutoTokenizer

    model_dir = prepare_model(args.preset)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    budget = input_budget(args)
    every_test = [p for s in SOURCES for p in held_out_pairs(s)]
    pool = training_pool(None, args.pairs, args.max_chars, args.seed)
    without = (
        without_analyses_rows(args, tokenizer, budget, every_test, pool) if args.target == "analysis-head" else None
    )
    analyses = own_analyses(args, every_test, pool) if args.target == "analysis-head" else None
    test_rows = verdict_rows(every_test, tokenizer, budget, orders="both", analyses=analyses)
    pool_rows = verdict_rows(pool, tokenizer, budget, orders="one", analyses=analyses)
    store_dir = args.out / "features"
    if any(row.key not in FeatureStore(store_dir) for row in test_rows + pool_rows):
        in_own_process(extract_stage, str(model_dir), test_rows + pool_rows, store_dir)  # test rows first
    store, base = FeatureStore(store_dir), verdict_direction(model_dir, tokenizer)
    test_x = store.get([r.key for r in test_rows])
    (args.out / "base.json").write_text(
        json.dumps({"records": [r.to_dict() for r in head_records(every_test, test_rows, test_x @ base)]})
    )
    source_of = {p.id: p.source for p in pool}
    for held_out in folds:
        started = time.perf_counter()
        mine = fold_rows(pool, pool_rows, held_out)
        head, choice = fit_fold(store, mine, base)
        fold = args.out / f"fold-{held_out}"
        fold.mkdir(parents=True, exist_ok=True)
        np.save(fold / "head.npy", head.delta)
        wanted = {p.id for p in fold_test_pairs(held_out)}
        judged = [r for r in head_records(every_test, test_rows, head.logit(test_x, base)) if r.pair_id in wanted]
        (fold / "judged.json").write_text(json.dumps({"records": [r.to_dict() for r in judged]}))
        if without is not None:
            plain_store, plain_test, plain_pool = without
            same = {(r.pair_id, r.swapped) for r in mine}
            plain_head, _ = fit_fold(plain_store, [r for r in plain_pool if (r.pair_id, r.swapped) in same], base)
            plain_logits = plain_head.logit(plain_store.get([r.key for r in plain_test]), base)
            plain = [r for r in head_records(every_test, plain_test, plain_logits) if r.pair_id in wanted]
            (fold / "without_analyses.json").write_text(json.dumps({"records": [r.to_dict() for r in plain]}))
        (fold / "run_card.json").write_text(
            json.dumps(
                {
                    "train_rows": head.train_rows,
                    "seconds": time.perf_counter() - started,
                    **choice,
                    "train_loss": head.train_loss,
                    "rows_by_source": dict(Counter(source_of[r.pair_id] for r in mine)),
                },
                indent=1,
            )
        )
    if args.serve_check:
        serve_check(args, model_dir, args.serve_check)


def without_analyses_rows(args, tokenizer, budget, every_test: list[Pair], pool: list[Pair]):
    """The ``verdict-head`` target's features of the same pairs (its committed store), for the paired comparison."""
    folder = default_out("verdict-head", args.preset, list(SOURCES)) / "features"
    store = FeatureStore(folder)
    test_rows = verdict_rows(every_test, tokenizer, budget, orders="both")
    pool_rows = verdict_rows(pool, tokenizer, budget, orders="one")
    if missing := sum(r.key not in store for r in test_rows + pool_rows):
        raise SystemExit(
            f"{missing} rows have no features in {folder}: run the verdict-head target on this preset "
            f"with at least --pairs {args.pairs} first (it is the comparison without analyses)"
        )
    return store, test_rows, pool_rows


def head_model(args: argparse.Namespace, model_dir: Path, held_out: str) -> Path:
    """The fold's head folded into a copy of the base (float32, as the preset is served), kept in the user cache."""
    delta = np.load(args.out / f"fold-{held_out}" / "head.npy")
    out = cache_root() / "verdict-head" / hashlib.sha256(delta.tobytes()).hexdigest()[:16]
    if not is_prepared(out):
        source = {
            "name": f"{args.preset} + verdict head without {held_out}",
            "base": str(model_dir),
            "head_sha256": hashlib.sha256(delta.tobytes()).hexdigest(),
        }
        in_own_process(write_head_stage, str(model_dir), delta, out, source)
    return out


def write_head_stage(model_dir: str, delta: np.ndarray, out: Path, source: dict) -> None:
    log_to_stderr()
    write_head(model_dir, VerdictHead(delta=delta, l2=0.0, train_rows=0, train_loss=0.0), out, source)


def serve_check(args: argparse.Namespace, model_dir: Path, held_out: str) -> None:
    """The fold's head served by vLLM and judged by direct-prob on its held-out pairs: does the served judge give the
    verdicts the features predicted?"""
    fold, pairs = args.out / f"fold-{held_out}", held_out_pairs(held_out)
    if not (fold / "served.json").exists():
        in_own_process(
            judge,
            args,
            str(head_model(args, model_dir, held_out)),
            pairs,
            f"{args.preset} + head without {held_out}",
            fold / "served.json",
        )
    served, predicted = records(fold / "served.json", pairs), records(fold / "judged.json", pairs)
    agree = sum(a.verdicts == b.verdicts for a, b in zip(served, predicted))
    gaps = [
        abs(a.probabilities[0] - b.probabilities[0])
        for a, b in zip(served, predicted)
        if a.probabilities[0] is not None and b.probabilities[0] is not None
    ]
    (fold / "served_check.json").write_text(
        json.dumps(
            {
                "pairs": len(pairs),
                "same_verdicts": agree,
                "served_accuracy": summarize(served).accuracy.value,
                "predicted_accuracy": summarize(predicted).accuracy.value,
                "mean_abs_p_gap": sum(gaps) / len(gaps) if gaps else None,
                "max_abs_p_gap": max(gaps, default=None),
            },
            indent=1,
        )
    )


def lora_main(args: argparse.Namespace, folds: list[str]) -> None:
    """Each fold trained (resumed), merged and judged through vLLM; then the untrained base judged."""
    (args.out / ".gitignore").write_text(
        "# checkpoints stay local; commit the latest one by hand to resume elsewhere\nfold-*/sft/\n"
    )
    for held_out in folds:
        fold = args.out / f"fold-{held_out}"
        chosen = training_pool(held_out, args.pairs, args.max_chars, args.seed, args.balance_length)
        made_from = fold / "training.json"
        if made_from.exists() and json.loads(made_from.read_text()) != training_key(args, held_out, chosen):
            raise SystemExit(f"{fold} was trained with other settings or pairs: give another --out, or delete it")
        adapter = fold / "adapter"
        if not (adapter / "adapter_model.safetensors").exists():  # copied last: present means whole
            in_own_process(train, args, held_out, chosen)
        merged = cache_root() / "loso-merged" / fingerprint(adapter)
        runs = {"judged.json": TARGETS[args.target]}
        if args.target == "reflectrm":  # the same model without its reflection step: what reflecting adds
            runs["without_reflection.json"] = WITHOUT_REFLECTION
            runs["adaptive.json"] = ADAPTIVE
        for name, program in runs.items():
            if (fold / name).exists():
                continue
            if not (is_prepared(merged) and read_source(merged) == merged_source(args, adapter)):
                in_own_process(merge, args, adapter, merged)
            trained = "on the teacher file alone" if held_out == TEACHER_ONLY else f"without {held_out}"
            label = f"{args.preset} trained {trained}"
            in_own_process(judge, args, str(merged), fold_test_pairs(held_out), label, fold / name, program)
    if not (args.out / "base.json").exists():  # the untrained base, last: what training adds is the lesser question
        every_test = [p for s in SOURCES for p in held_out_pairs(s)]
        in_own_process(judge, args, args.preset, every_test, f"{args.preset} untrained", args.out / "base.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="verdict")
    parser.add_argument("--preset", default="qwen2.5-coder-0.5b", help="the base model trained in every fold")
    parser.add_argument("--pairs", type=int, default=480, help="training pairs per fold (two rows each)")
    parser.add_argument(
        "--max-chars", type=int, default=2000, help="training pairs whose texts fit in this many characters"
    )
    parser.add_argument(
        "--max-length", type=int, default=1024, help="training rows longer than this many tokens are left out"
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument(
        "--folds",
        default="all",
        help=f"comma-separated held-out sets, of {', '.join(SOURCES)}; or {TEACHER_ONLY}: all five held out, "
        "one model trained on the teacher file alone",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--balance-length",
        action="store_true",
        help="LoRA targets: choose each prompt's pair so the longer response wins in half of the training pairs "
        "(the teacher file's longer response wins five times in six); written to OUT-length-balanced",
    )
    parser.add_argument(
        "--serve-check",
        metavar="SOURCE",
        help="verdict-head: serve that fold's head through vLLM and "
        "judge its held-out pairs, to check the served judge gives the verdicts the features predicted",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/loso-TARGET-PRESET")
    args = parser.parse_args()
    folds = list(SOURCES) if args.folds == "all" else args.folds.split(",")
    if unknown := set(folds) - {*SOURCES, TEACHER_ONLY}:
        parser.error(f"unknown sets {sorted(unknown)}: choose from {', '.join(SOURCES)}, or {TEACHER_ONLY}")
    if TEACHER_ONLY in folds and (len(folds) > 1 or args.target.endswith("-head")):
        parser.error(f"--folds {TEACHER_ONLY} is a protocol of its own (one fold, a LoRA target: verdict or rationale)")
    if args.balance_length and args.target.endswith("-head"):
        parser.error("--balance-length chooses LoRA training pairs; a head's pool is fixed by its committed features")
    if args.target in TEACHER_TARGETS and folds != [TEACHER_ONLY]:
        parser.error(
            f"the {args.target} target trains on the teacher file's analyses, which only the teacher has: "
            f"use --folds {TEACHER_ONLY} (every set held out), and the verdict target on it for the comparison"
        )
    if args.serve_check and args.target != "verdict-head":
        parser.error(
            "--serve-check is for the verdict-head target: an analysis head folded into the LM head also moves the "
            "letters A and B inside the analyses it writes, so served and predicted would differ for that reason too"
        )
    args.out = args.out or default_out(args.target, args.preset, folds, args.balance_length)
    log_to_stderr()
    args.out.mkdir(parents=True, exist_ok=True)
    (head_main if args.target.endswith("-head") else lora_main)(args, folds)
    done = [s for s in (*SOURCES, TEACHER_ONLY) if (args.out / f"fold-{s}" / "judged.json").exists()]
    meta = {
        **provenance(),
        "target": args.target,
        "preset": args.preset,
        "pairs_per_fold": args.pairs,
        "folds_done": done,
        "settings": {
            k: getattr(args, k)
            for k in ("max_chars", "max_length", "epochs", "learning_rate", "seed", "balance_length")
        },
    }
    summary = report(args, done)
    (args.out / "report.md").write_text(markdown(args, summary, meta))
    serial = json.loads(json.dumps(summary, default=lambda o: o.__dict__))
    (args.out / "report.json").write_text(json.dumps({"meta": meta, **serial}, indent=1))
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
