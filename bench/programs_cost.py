"""Cost and agreement of the judge programs on the same real pairs (issue 4's measurement).

    .venv/bin/python bench/programs_cost.py [--per-source 25] [--seed 0] [--backend embedded]

Draws ``--per-source`` labelled (non-tie) pairs from each file of ../shared/data (seeded),
runs GenRM (one order), GenRM (both orders), full ReflectRM and adaptive ReflectRM on them,
and prints LM calls and tokens per verdict, verdicts, accuracy and the agreement between
full and adaptive ReflectRM. Costs are what each judgment took to produce (cached or not),
so the programs can share one cache and run in any order.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import reflectagent as ra
from reflectagent.programs import AdaptiveReflectRM, GenRM, ReflectRM

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = ("hh_rlhf_harmless_test.jsonl", "rmbench.jsonl", "pandalm.jsonl", "hhh_alignment.jsonl")


def draw(per_source: int, seed: int) -> list[ra.Pair]:
    rng = random.Random(seed)
    chosen = []
    for name in FILES:
        pairs, _ = ra.read_pairs(SHARED / name)
        labelled = [p for p in pairs if p.label in ("A", "B") and not p.identical]
        chosen += rng.sample(labelled, per_source)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-source", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="embedded")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/programs_cost.json"))
    args = parser.parse_args()

    pairs = draw(args.per_source, args.seed)
    programs = {
        "GenRM (one order)": GenRM(),
        "GenRM (both orders)": GenRM(both_orders=True),
        "ReflectRM (full)": ReflectRM(),
        "ReflectRM (adaptive)": AdaptiveReflectRM(),
    }
    rows, verdicts = [], {}
    with ra.backend(args.backend):
        for name, program in programs.items():
            started = time.perf_counter()
            judgments = ra.judge_pairs(program, pairs, concurrency=args.concurrency)
            wall = time.perf_counter() - started
            verdicts[name] = [j.preference for j in judgments]
            n = len(judgments)
            cost = sum((j.cost for j in judgments), ra.Usage())
            rows.append(
                {
                    "program": name,
                    "pairs": n,
                    "verdicts": sum(j.parsed for j in judgments),
                    "correct": sum(j.preference == p.label for p, j in zip(pairs, judgments)),
                    "calls_per_verdict": cost.lm_calls / n,
                    "prompt_tokens_per_verdict": cost.prompt_tokens / n,
                    "completion_tokens_per_verdict": cost.completion_tokens / n,
                    "calls_this_run": sum(j.lm_calls for j in judgments),
                    "wall_s_this_run": wall,
                    "reflected": sum(bool(j.reflections) for j in judgments),
                }
            )
    agree = sum(a == f for a, f in zip(verdicts["ReflectRM (adaptive)"], verdicts["ReflectRM (full)"]))
    print(f"{len(pairs)} pairs: {args.per_source} per file of {', '.join(FILES)} (seed {args.seed})\n")
    print(
        "| program | verdicts | correct | LM calls / verdict | prompt tok / verdict | completion tok / verdict | reflected |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['program']} | {r['verdicts']} | {r['correct']} | {r['calls_per_verdict']:.2f} | "
            f"{r['prompt_tokens_per_verdict']:.0f} | {r['completion_tokens_per_verdict']:.0f} | {r['reflected']} |"
        )
    full, adaptive = rows[2]["calls_per_verdict"], rows[3]["calls_per_verdict"]
    print(
        f"\nfull vs adaptive ReflectRM: same verdict on {agree}/{len(pairs)} pairs; "
        f"adaptive saves {1 - adaptive / full:.0%} of the LM calls"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"pairs": [p.id for p in pairs], "rows": rows, "agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
