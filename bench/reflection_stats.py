"""Does the reflection step pick the right analysis? Read from a bench's saved judgments, no LM call.

    .venv/bin/python bench/reflection_stats.py bench/results/quality-1.5b [--programs reflectrm-prob,reflectrm-prob+demos]

ReflectRM's claim is that a model choosing between its own analyses picks the reliable one. The place to
see that is where two analyses reach different verdicts: there the reflection decides, and a reflector
that judges picks the one that agrees with the label more often than half the time. Per ReflectRM program
in ``FOLDER/judgments.jsonl.gz`` (written by ``reflectagent.eval.write_report``), over its parsed
reflections: how many compared two analyses that disagree, how often the chosen one was right (by the
generated choice, and by the choice token's probability, the expected share right), with a bootstrap
interval over pairs; and how often the reflector chose the analysis shown to it first, everywhere, which
is its position bias. Printed as a markdown table and written to ``FOLDER/reflection_stats.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

FLIP = {"A": "B", "B": "A"}


def reflection_rows(judgments: list[dict]) -> dict[str, list[dict]]:
    """Each ReflectRM program's parsed reflections, one row each, with the pair they belong to."""
    rows = defaultdict(list)
    for saved in judgments:
        label = saved["pair"].get("label")
        for shown, judgment in enumerate(saved["judgments"]):  # 0: as given, 1: swapped
            truth = label if shown == 0 else FLIP.get(label)
            analyses = judgment.get("analyses") or []
            for reflection in judgment.get("reflections") or []:
                if not reflection.get("parsed"):
                    continue
                first, second = analyses[reflection["first"]], analyses[reflection["second"]]
                p_first = reflection.get("probability_first")
                rows[saved["program"]].append(
                    {
                        "pair": saved["pair"]["id"],
                        "chose_first": reflection["more_reliable"] == reflection["first"],
                        "p_first": p_first,
                        "disagree": bool(first["parsed"] and second["parsed"])
                        and first["preference"] != second["preference"],
                        "first_right": first["preference"] == truth,
                        "labelled": truth in FLIP,
                    }
                )
    return rows


def bootstrap(values_by_pair: dict[str, list[float]], draws: int = 2000, seed: int = 0) -> list[float] | None:
    """95% interval of the mean, resampling pairs (a pair's reflections stay together)."""
    pairs = [v for v in values_by_pair.values() if v]
    if len(pairs) < 2:
        return None
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        drawn = [x for _ in pairs for x in rng.choice(pairs)]
        means.append(sum(drawn) / len(drawn))
    means.sort()
    return [means[int(0.025 * draws)], means[int(0.975 * draws) - 1]]


def stats(rows: list[dict]) -> dict:
    deciding = [r for r in rows if r["disagree"] and r["labelled"]]
    right, soft = defaultdict(list), defaultdict(list)
    for r in deciding:
        right[r["pair"]].append(float(r["chose_first"] == r["first_right"]))
        if r["p_first"] is not None:
            soft[r["pair"]].append(r["p_first"] if r["first_right"] else 1 - r["p_first"])
    mean = lambda groups: (  # noqa: E731
        sum(x for v in groups.values() for x in v) / sum(len(v) for v in groups.values()) if groups else None
    )
    return {
        "reflections": len(rows),
        "chose_first_shown": sum(r["chose_first"] for r in rows) / len(rows) if rows else None,
        "deciding": len(deciding),
        "picked_right": mean(right),
        "picked_right_ci": bootstrap(right),
        "expected_right_by_probability": mean(soft),
        "expected_right_by_probability_ci": bootstrap(soft),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a bench's results folder, holding judgments.jsonl.gz")
    parser.add_argument("--programs", default="", help="comma-separated programs (default: every one with reflections)")
    args = parser.parse_args()
    with gzip.open(args.folder / "judgments.jsonl.gz", "rt") as f:
        rows = reflection_rows([json.loads(line) for line in f])
    wanted = [p for p in rows if not args.programs or p in args.programs.split(",")]
    result = {program: stats(rows[program]) for program in wanted}
    (args.folder / "reflection_stats.json").write_text(json.dumps(result, indent=1))
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    ci = lambda c: "" if not c else f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"  # noqa: E731
    print(
        "| program | reflections | chose the analysis shown first | between disagreeing analyses "
        "| chose the right one | expected right, by probability |\n|---|---|---|---|---|---|"
    )
    for program, s in result.items():
        print(
            f"| {program} | {s['reflections']} | {pct(s['chose_first_shown'])} | {s['deciding']} | "
            f"{pct(s['picked_right'])}{ci(s['picked_right_ci'])} | "
            f"{pct(s['expected_right_by_probability'])}{ci(s['expected_right_by_probability_ci'])} |"
        )


if __name__ == "__main__":
    main()
