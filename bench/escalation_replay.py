"""EscalatingJudge's accuracy-against-cost curve replayed from a report's stored judgments: no LM call, no server.

    .venv/bin/python bench/escalation_replay.py bench/results/quality-1.5b --stages direct-prob,genrm-prob,reflectrm-prob

A report folder's ``judgments.jsonl.gz`` holds every run's judgment of every pair in both presentations. Where
its runs include the stages of a ladder (named programs, cheapest first), each pair's climb is read off them
(:meth:`EscalatingJudge.replay`), a step two stages share being charged once, as a live run with the cache
does, at each threshold. The figures are on that report's pairs, which are test pairs in the quality benches:
this draws the curve over every threshold and chooses none (thresholds are chosen on dev pairs,
``reflectagent calibrate``). Also written: each stored run's expected calibration error, and an eval report
folder of the replayed runs (``--out``: report.md, plots/accuracy_vs_cost.png with the curve, reliability.png).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from reflectagent.eval import write_report
from reflectagent.eval.metrics import Record, summarize, summarize_by_category
from reflectagent.eval.runner import RunResult
from reflectagent.pairs import parse_pair
from reflectagent.programs import EscalatingJudge, named_program
from reflectagent.programs.escalating import THRESHOLDS, charge_once
from reflectagent.results import Judgment

from provenance import provenance  # bench/, beside this script


def stored(folder: Path) -> tuple[list, dict[str, list[tuple[Judgment, Judgment]]], str]:
    """The pairs in order, each program's (as given, swapped) judgments in that order, and the backend."""
    pairs, runs, backend = defaultdict(list), defaultdict(list), ""
    with gzip.open(folder / "judgments.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            backend = row["backend"]
            pairs[row["program"]].append(parse_pair(row["pair"]))
            runs[row["program"]].append(tuple(Judgment.from_dict(j) for j in row["judgments"]))
    orders = {tuple((p.id, p.prompt) for p in listed) for listed in pairs.values()}
    if len(orders) != 1:
        raise SystemExit(f"{folder}: the runs did not judge the same pairs in the same order")
    return next(iter(pairs.values())), runs, backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="an eval report folder with judgments.jsonl.gz")
    parser.add_argument(
        "--stages", default="direct-prob,genrm-prob,reflectrm-prob", help="named programs, cheapest first"
    )
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    parser.add_argument("--out", type=Path, help="write an eval report folder of the stages and the replayed runs here")
    args = parser.parse_args()
    names = args.stages.split(",")
    pairs, runs, backend = stored(args.report)
    missing = [n for n in names if n not in runs]
    if missing:
        raise SystemExit(f"{args.report} has no run of {', '.join(missing)}; it has {', '.join(runs)}")
    judge = EscalatingJudge([(named_program(n), None) for n in names], names, threshold=1.0)
    climbs = []  # per pair, (as given, swapped): every stage, shared steps charged once
    for i in range(len(pairs)):
        both = []
        for side in (0, 1):
            parts = []
            for name in names:
                parts.append(charge_once(runs[name][i][side], parts))
            both.append(Judgment(preference=None, parts=tuple(parts)))
        climbs.append(both)

    def result(label: str, judged: list[tuple[Judgment, Judgment]]) -> RunResult:
        records = [Record.from_judgments(p, a, b) for p, (a, b) in zip(pairs, judged)]
        return RunResult(
            label,
            backend,
            records,
            summarize(records),
            summarize_by_category(records),
            summarize_by_category([replace(r, category=r.source) for r in records]),
        )

    results = [result(name, runs[name]) for name in names]
    for threshold in sorted(float(t) for t in args.thresholds.split(",")):
        results.append(
            result(
                f"escalating-prob:{threshold:g}", [tuple(judge.replay(j, threshold) for j in both) for both in climbs]
            )
        )
    rows = []
    for r in results:
        s = r.overall
        rows.append(
            {
                "run": r.program,
                "accuracy": s.accuracy.value,
                "ci": s.accuracy.ci,
                "calls_per_verdict": s.cost_per_verdict.lm_calls,
                "tokens_per_verdict": s.cost_per_verdict.tokens,
                "no_verdict": s.no_verdict.value,
                "ece": s.calibration.ece if s.calibration else None,
            }
        )
        ci = f"[{s.accuracy.ci[0]:.1%}, {s.accuracy.ci[1]:.1%}]" if s.accuracy.ci else ""
        ece = f"ECE {s.calibration.ece:.3f}" if s.calibration and s.calibration.ece is not None else "ECE n/a"
        print(
            f"{r.program:26s} accuracy {s.accuracy.value:.1%} {ci:16s} calls/verdict {s.cost_per_verdict.lm_calls:.2f}  {ece}"
        )
    stages = {}
    for threshold in sorted(float(t) for t in args.thresholds.split(",")):
        stages[f"{threshold:g}"] = dict(
            Counter(judge.replay(j, threshold).decided_by or "none" for both in climbs for j in both)
        )
    out = {
        **provenance(),
        "report": str(args.report),
        "pairs": len(pairs),
        "stages": names,
        "runs": rows,
        "decided_by": stages,
    }
    target = Path("bench/results") / f"escalation-replay-{args.report.name}.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {target}")
    if args.out:
        write_report(
            results,
            args.out,
            {
                "data": [f"{args.report} (stored judgments)"],
                "pairs": len(pairs),
                "split": "test",
                "seed": 0,
                "baseline": names[0],
            },
        )
        print(f"report: {args.out}/report.md")


if __name__ == "__main__":
    main()
