"""A fixed sample of GenRM analyses written by the shipped preset, dumped for a person to read and grade.

    .venv/bin/python bench/audit_analyses.py [--report bench/results/quality-1.5b-verdict-bf16] [--per-source 6] [--seed 0] [--out bench/results/analysis-audit]

Accuracy says how often a verdict is right, not whether the analysis before it is worth reading (issue #30:
"its analyses should be about the responses and right more often than not"). This draws ``--per-source``
pairs of each of the five sets from a report's ``genrm-prob`` run (seeded), takes one presentation of each
(as given or swapped, half and half within each set, seeded), and writes what the model was shown and what it
wrote: the prompt, response A and B in that order (cut to ``--max-chars`` for reading), the analysis, the
verdict it led to with its probability, and the human label in that presentation. Each pair is checked against
its row in ../shared/data. It reads only committed files (the report's ``judgments.jsonl.gz``, which holds the
same steps as its ``cache/``): no LM call, no server, no model. The grades are a person's, kept beside it in
``grades.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import sys
from pathlib import Path

from common import SHARED, SOURCES, load_source  # bench/, beside this script
from provenance import provenance

PRESENTATIONS = ("as given", "swapped")
FLIP = {"A": "B", "B": "A"}

logger = logging.getLogger("audit_analyses")


def stored_pairs(report: Path, program: str) -> list[dict]:
    """The run's rows in the report's order: each the pair and its (as given, swapped) judgments."""
    with gzip.open(report / "judgments.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [row for row in map(json.loads, handle) if row["program"] == program]
    if not rows:
        raise SystemExit(f"{report} has no {program} run")
    return rows


def draw(rows: list[dict], per_source: int, seed: int) -> list[tuple[dict, int]]:
    """``per_source`` rows of each set and, for each, a presentation: half as given, half swapped per set. Each
    stored pair is checked against its row in ../shared/data (the set's file, read as every bench reads it)."""
    rng = random.Random(seed)
    chosen = []
    for source in SOURCES:
        given = {pair.id: pair for pair in load_source(source)}
        of_source = [row for row in rows if row["pair"]["id"] in given]
        picked = sorted(rng.sample(range(len(of_source)), per_source))
        sides = [i % 2 for i in range(per_source)]
        rng.shuffle(sides)
        for i, side in zip(picked, sides):
            stored = of_source[i]["pair"]
            if any(
                stored[f] != getattr(given[stored["id"]], f) for f in ("prompt", "response_a", "response_b", "label")
            ):
                raise SystemExit(f"{stored['id']}: the stored pair is not its row in {SHARED / source}.jsonl")
            chosen.append((of_source[i], side))
    return chosen


def entry(row: dict, side: int) -> dict:
    """What the model saw in that presentation and what it wrote: the analysis it made in that order."""
    pair = row["pair"]
    judgment = row["judgments"][side]
    made = [a for a in judgment["analyses"] if not a["swapped"]]  # the steps made in this presentation's order
    if len(made) != 1:
        raise SystemExit(f"{pair['id']}: {len(made)} analyses in one order; this audit reads programs that write one")
    [analysis] = made
    first, second = (pair["response_a"], pair["response_b"]) if side == 0 else (pair["response_b"], pair["response_a"])
    label = pair["label"] if side == 0 else FLIP[pair["label"]]
    return {
        "id": pair["id"],
        "source": pair["source"],
        "category": pair["category"],
        "presentation": PRESENTATIONS[side],
        "prompt": pair["prompt"],
        "response_a": first,
        "response_b": second,
        "analysis": analysis["text"],
        "verdict": analysis["preference"],
        "verdict_probability": rounded(analysis["probability"]),
        "human_label": label,
        "pair_verdict_both_orders": judgment["preference"],  # genrm-prob's verdict: both orders' P(A) averaged
        "pair_probability_a": rounded(judgment["probability_a"]),
    }


def rounded(probability: float | None) -> float | None:
    return None if probability is None else round(probability, 3)  # None: no verdict (a tie or no parse)


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}\n[... cut: {len(text) - limit} more characters]"


def fence(text: str) -> str:
    return "````text\n" + text.rstrip() + "\n````"


def markdown(entries: list[dict], meta: dict, limit: int) -> str:
    lines = [
        "# GenRM analyses to audit",
        "",
        f"`{meta['command']}`: {len(entries)} analyses by `{meta['backend']}` ({meta['program']}) from "
        f"`{meta['report']}`, {meta['per_source']} per set, seed {meta['seed']}; responses and prompt cut to "
        f"{limit} characters here (`sample.json` keeps them whole). A and B are as the model was shown them; "
        "the verdict is this analysis's own (its probability is the verdict token's), the label is the human's "
        "in the same order. Grades: `grades.md`.",
        "",
    ]
    for n, e in enumerate(entries, 1):
        right = "right" if e["verdict"] == e["human_label"] else "wrong"
        lines += [
            f"## {n}. `{e['id']}` ({e['source']}, {e['category']}), {e['presentation']}",
            "",
            f"verdict **{e['verdict']}** (p {e['verdict_probability']}), human label **{e['human_label']}**: {right}. "
            f"genrm-prob on the pair (both orders): {e['pair_verdict_both_orders'] or 'tie'}, "
            f"P(A) {e['pair_probability_a']}",
            "",
            "**Prompt**",
            "",
            fence(cut(e["prompt"], limit)),
            "",
            "**Response A**",
            "",
            fence(cut(e["response_a"], limit)),
            "",
            "**Response B**",
            "",
            fence(cut(e["response_b"], limit)),
            "",
            "**Analysis**",
            "",
            fence(e["analysis"]),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=Path("bench/results/quality-1.5b-verdict-bf16"))
    parser.add_argument("--program", default="genrm-prob")
    parser.add_argument("--per-source", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=1500, help="prompt and responses cut to this in sample.md")
    parser.add_argument("--out", type=Path, default=Path("bench/results/analysis-audit"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    rows = stored_pairs(args.report, args.program)
    chosen = draw(rows, args.per_source, args.seed)
    entries = [entry(row, side) for row, side in chosen]
    meta = {
        **provenance(),
        "report": str(args.report),
        "program": args.program,
        "backend": rows[0]["backend"],
        "per_source": args.per_source,
        "seed": args.seed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sample.json").write_text(
        json.dumps({"meta": meta, "analyses": entries}, indent=1) + "\n", encoding="utf-8"
    )
    (args.out / "sample.md").write_text(markdown(entries, meta, args.max_chars), encoding="utf-8")
    agree = sum(e["verdict"] == e["human_label"] for e in entries)
    logger.info("%d analyses written to %s; %d verdicts agree with the label", len(entries), args.out, agree)


if __name__ == "__main__":
    main()
