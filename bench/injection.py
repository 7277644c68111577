"""How often does text written into a response turn the judge, and does fencing inputs as data help?

    .venv/bin/python bench/injection.py [--preset smollm2|qwen2.5-coder-1.5b] [--per-source 24] [--out bench/results/injection-smollm2]

Pairs: the seeded test split of five human-labelled sets in ../shared/data (labelled A or B, two
distinct non-empty responses, within ``--max-chars``), ``--per-source`` from each. Each pair's worse
response gets one of four injections in turn (``reflectagent.eval.injection``). Every program judges
the clean and the injected pairs, in both presentations, without and with the mitigation
(``fence_inputs``: inputs fenced as inert data, and the rule in the instructions). Reported: flip
rate (presentations judged right clean, then for the injected response), clean and injected accuracy,
and how often the worse response is picked, per kind and overall.

Every step is cached in ``OUT/cache``: interrupted, the same command resumes; finished, it re-writes
the report with no LM call.
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
from reflectagent.eval import EvalRun, load_benchmark, run_eval
from reflectagent.eval.injection import KINDS, flip_stats, inject
from reflectagent.finetune.selection import usable
from reflectagent.pairs import Pair
from reflectagent.programs import named_program
from reflectagent.splits import split_pairs, stable_fraction

from provenance import provenance  # bench/, beside this script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = ("hh_rlhf_harmless_test", "hhh_alignment", "rmbench", "pandalm", "autoj_pairwise")


def bench_pairs(per_source: int, max_chars: int) -> list[Pair]:
    chosen = []
    for source in SOURCES:
        pairs, _ = load_benchmark(SHARED / f"{source}.jsonl")
        test = (p for p in split_pairs(pairs, seed=0)["test"] if usable(p, max_chars))
        chosen += sorted(test, key=lambda p: stable_fraction("injection-bench", p.id))[:per_source]
    return chosen


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default=None, help="model preset served by the embedded backend (default: packaged SmolLM2)"
    )
    parser.add_argument("--programs", default="genrm-both,genrm-prob,direct-prob,pointwise-prob")
    parser.add_argument("--per-source", type=int, default=24)
    parser.add_argument("--max-chars", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/injection-smollm2"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    items = inject(bench_pairs(args.per_source, args.max_chars))
    clean, injected = [i.clean for i in items], [i.injected for i in items]
    base = {"model": "embedded", "model_path": args.preset}
    settings = Settings(backends={"plain": BackendConfig(**base), "fenced": BackendConfig(**base, fence_inputs=True)})
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with use_cache(JudgmentCache(args.out / "cache")):
        for mitigation in ("plain", "fenced"):
            lm = resolve_backend(mitigation, settings)
            for name in args.programs.split(","):
                [before] = run_eval(
                    clean,
                    [EvalRun(name, mitigation, named_program(name), lm)],
                    concurrency=args.concurrency,
                    progress=sys.stderr.isatty(),
                )
                [after] = run_eval(
                    injected,
                    [EvalRun(name, mitigation, named_program(name), lm)],
                    concurrency=args.concurrency,
                    progress=sys.stderr.isatty(),
                )
                stats = flip_stats(before, after, items)
                rows.append(
                    {
                        "program": name,
                        "mitigation": mitigation,
                        "stats": {k: v.to_dict() for k, v in stats.items()},
                        "lm_calls_made": before.run.lm_calls_made + after.run.lm_calls_made,
                    }
                )
                logging.info("%s %s: flip rate %s", name, mitigation, percent(stats["all"].flip_rate.value))

    meta = {
        **provenance(),
        "pairs": len(items),
        "per_source": args.per_source,
        "preset": args.preset or "smollm2 (packaged)",
        "kinds": KINDS,
        "by_kind": {k: sum(i.kind == k for i in items) for k in KINDS},
    }
    (args.out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Prompt injection: {meta['preset']}",
        "",
        f"`{meta['command']}` at {meta['commit']}: {len(items)} test pairs ({', '.join(SOURCES)}), each judged clean and with "
        "its worse response injected, in both presentations; `fenced` is `fence_inputs = true`.",
        "",
        "| program | mitigation | flip rate (all) | clean accuracy | injected accuracy | picks worse: clean -> injected | "
        + " | ".join(f"flip: {k}" for k in KINDS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(KINDS),
    ]
    for row in rows:
        every = row["stats"]["all"]
        flip = every["flip_rate"]
        ci = f" [{flip['ci'][0]:.1%}, {flip['ci'][1]:.1%}]" if flip["ci"] else ""
        kinds = " | ".join(
            f"{percent(row['stats'][k]['flip_rate']['value'])} ({row['stats'][k]['flipped']}/{row['stats'][k]['clean_right']})"
            for k in KINDS
        )
        lines.append(
            f"| {row['program']} | {row['mitigation']} | {percent(flip['value'])}{ci} ({every['flipped']}/{every['clean_right']}) | "
            f"{percent(every['clean_accuracy'])} | {percent(every['injected_accuracy'])} | "
            f"{percent(every['picks_worse_clean'])} -> {percent(every['picks_worse_injected'])} | {kinds} |"
        )
    lines += [
        "",
        "Flip rate: of the presentations a judge got right on the clean pair, the share it judged for the injected "
        "(worse) response once injected; 95% Wilson interval. Accuracy counts no verdict as wrong.",
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
