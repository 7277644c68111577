"""Do the judges judge? Accuracy with intervals, consistency, calls and seconds per verdict, on a local preset.

    .venv/bin/python bench/judge_quality.py [--preset qwen2.5-coder-1.5b] [--dtype float32] [--per-source 32] [--skip 0] [--out bench/results/quality-1.5b]

Test pairs: the seeded test split (``reflectagent.splits``, seed 0) of five human-labelled sets in
../shared/data, labelled A or B, two distinct non-empty responses, prompt plus responses within
``--max-chars``, ``--per-source`` from each, each pair judged as given and swapped. Nothing here is
compiled or trained on them: demos are drawn (seeded, by length only) from the teacher file, after
every teacher row whose prompt is a test prompt is left out.

Runs: each response rated alone (``pointwise-prob`` by expected rating, ``pointwise`` by the generated
digit: the same steps); the verdict token's probability without a rationale (``direct-prob``); the
mean of those two P(A)s (``direct+pointwise-prob``, from their steps); GenRM
(one order, both orders, by probability), the MT-Bench prompt (the peer baseline) on the same model,
then ReflectRM (vote, probability, adaptive); GenRM and ReflectRM also with two teacher demos
(pairwise analyses: nothing for a pointwise rater to use).
Every step is cached in ``OUT/cache``, which is committed with the results: interrupted (or moved to
another machine), the same command resumes; finished, it re-writes the report from the cache with no
LM call and no server started. Each run's result is also kept as it finishes (``OUT/runs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.eval import EvalRun, run_eval, write_report
from reflectagent.programs import named_program
from reflectagent.programs.compile import teacher_demos, with_demos
from reflectagent.teacher import read_teacher

from common import SOURCES, TEACHER, test_pairs  # bench/, beside this script

POINTWISE = ("pointwise-prob", "pointwise")
GENRM = ("genrm", "genrm-both", "genrm-prob")
DIRECT = "direct-prob"  # the verdict token alone, no rationale: nothing for analysis demos to change
MIXED = "direct+pointwise-prob"  # the two above averaged: free once both have run
REFLECTRM = ("reflectrm", "reflectrm-prob", "reflectrm-adaptive")
PROGRAMS = GENRM + REFLECTRM
PEER = "mtbench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default="qwen2.5-coder-1.5b", help="model preset (or folder) served by the embedded backend"
    )
    parser.add_argument(
        "--dtype", default=None, help="the server's dtype (default: the preset's; bfloat16 for the first runs)"
    )
    parser.add_argument("--per-source", type=int, default=32)
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="leave out the first SKIP pairs of each source's order: a fresh, disjoint sample",
    )
    parser.add_argument("--max-chars", type=int, default=2500)
    parser.add_argument("--demos", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=900.0,
        help="per request; ReflectRM's long reflections at concurrency 4 took over the library's 300 s on two cores",
    )
    parser.add_argument("--only", default="", help="comma-separated run labels to judge now (default: all, in order)")
    parser.add_argument(
        "--baseline",
        default="mtbench",
        help="the run the others are paired against (default: the peer "
        "baseline); when --only leaves it out, the first run judged",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: OUT/cache, committed with the results")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality-1.5b"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    pairs = test_pairs(args.per_source, args.max_chars, args.skip)
    every, _ = read_teacher(TEACHER)
    teacher, _ = read_teacher(TEACHER, exclude_prompts=[p.prompt for p in pairs])
    demos = teacher_demos(teacher, k=args.demos, seed=0)
    backend = BackendConfig(model="embedded", model_path=args.preset, dtype=args.dtype, timeout_s=args.timeout_s)
    settings = Settings(backends={"local": backend})
    lm = resolve_backend("local", settings)
    dtype = lm.backend.identity.get("dtype", "bfloat16")
    label = f"{args.preset} {dtype}"
    # Cheapest first, the baseline early: an interrupted bench has the comparison that matters most.
    runs = [
        EvalRun(name, label, named_program(name), lm) for name in (*POINTWISE, DIRECT, MIXED, *GENRM, PEER, *REFLECTRM)
    ]
    runs += [EvalRun(f"{name}+demos", label, with_demos(named_program(name), demos), lm) for name in PROGRAMS]
    wanted = [r for r in runs if not args.only or r.program in args.only.split(",")]
    if args.baseline not in {r.program for r in runs}:
        parser.error(f"--baseline {args.baseline!r} is not a run: one of {', '.join(r.program for r in runs)}")

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with use_cache(JudgmentCache(args.cache_dir or args.out / "cache")):
        for run in wanted:  # one run at a time, so an interrupted bench keeps whole runs
            [result] = run_eval(pairs, [run], concurrency=args.concurrency, progress=sys.stderr.isatty())
            results.append(result)
            (args.out / "runs").mkdir(exist_ok=True)
            (args.out / "runs" / f"{run.program}.json").write_text(
                json.dumps({**result.to_dict(), "run": result.run_dict()})
            )
            logging.info(
                "%s: accuracy %s, %s LM calls made",
                run.program,
                result.overall.accuracy.value,
                result.run.lm_calls_made,
            )
    meta = {
        "data": [f"{s}.jsonl (test split, seed 0)" for s in SOURCES],
        "pairs": len(pairs),
        "split": "test",
        "seed": 0,
        "per_source": args.per_source,
        "skip": args.skip,
        "max_chars": args.max_chars,
        "preset": args.preset,
        "dtype": dtype,
        "demos": [{"prompt": d.prompt[:80], "preference": d.preference} for d in demos],
        "teacher_rows_left_out_for_sharing_a_test_prompt": len(every) - len(teacher),
        "baseline": args.baseline if any(r.program == args.baseline for r in results) else None,
    }
    write_report(results, args.out, meta)
    print((args.out / "report.md").read_text().split("## Accuracy per category")[0])


if __name__ == "__main__":
    main()
