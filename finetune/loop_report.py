"""The fine-tuning loop's report: one row per model x program, one column group per eval set.

It reuses the eval report's cells and its per-set reports (``eval/dev``, ``eval/unseen``), and
adds what only the loop knows: wall time per stage, the training cards and the data card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reflectagent.eval.report import format_ci, format_value, metric_values, write_report
from reflectagent.eval.runner import RunResult
from reflectagent.finetune.run_card import RunCard

COLUMNS = ("accuracy", "consistency", "parse failures", "no verdict")


def loop_markdown(
    results: dict[str, list[RunResult]],
    stages: dict[str, float],
    cards: dict[str, RunCard],
    data_card: dict[str, Any] | None,
    meta: dict[str, Any],
) -> str:
    names = list(results)
    lines = [
        "# Fine-tuning loop report",
        "",
        f"Pairs: {meta['pairs']} (seed {meta['seed']}). `dev`: held-out pairs of the training sources; "
        "`unseen`: sources never trained on. Each pair is judged in both presentations; accuracy counts no "
        "verdict as wrong. `(free)`: the same model without constrained decoding.",
        "",
        "| model | program | " + " | ".join(f"{n}: {label}" for n in names for label in COLUMNS) + " |",
        "|---|---|" + "---|" * (len(names) * len(COLUMNS)),
    ]
    rows = list(dict.fromkeys((r.backend, r.program) for runs in results.values() for r in runs))
    for backend, program in rows:
        cells = []
        for name in names:
            match = next((r for r in results[name] if (r.backend, r.program) == (backend, program)), None)
            values = metric_values(match.overall, match.run) if match else {}
            for label in COLUMNS:
                cell = format_value(values.get(label), "{:.1%}")
                if label == "accuracy" and match:
                    cell += format_ci(match.overall.accuracy.ci)
                cells.append(cell)
        lines.append(f"| {backend} | {program} | " + " | ".join(cells) + " |")
    lines += ["", "## Stages (wall time)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in stages.items()]
    lines += [
        f"| total | {sum(stages.values()):.0f} |",
        "",
        "## Training",
        "",
        "| model | rows | steps | first loss | final loss | dev loss | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, card in cards.items():
        losses = " | ".join(format_value(v, "{:.3f}") for v in (card.first_loss, card.final_loss, card.eval_loss))
        lines.append(
            f"| {name} | {card.train_rows} {card.rows_by_kind or ''} | {card.steps} | {losses} | {card.seconds:.0f} |"
        )
    lines += [""] + [f"![{name} training curve](models/{name}/training_curve.png)" for name in cards]
    if data_card:
        lines += [
            "",
            "## Data",
            "",
            "```json",
            json.dumps({k: v for k, v in data_card.items() if k != "config"}, indent=1),
            "```",
        ]
    lines += [
        "",
        "Per-set reports with per-source tables and plots: `eval/dev/report.md`, `eval/unseen/report.md`.",
        "",
    ]
    return "\n".join(lines)


def write_loop_report(
    out: Path,
    results: dict[str, list[RunResult]],
    stages: dict[str, float],
    set_meta: dict[str, dict[str, Any]],
    meta: dict[str, Any],
) -> Path:
    """``eval/<set>/`` reports, ``report.md`` and ``summary.json`` in the loop's folder ``out``."""
    for name, runs in results.items():
        write_report(runs, out / "eval" / name, set_meta[name])
    cards = {card.parent.name: RunCard.read(card.parent) for card in sorted((out / "models").glob("*/run_card.json"))}
    data_path = out / "data" / "data_card.json"
    data_card = json.loads(data_path.read_text()) if data_path.exists() else None
    report = out / "report.md"
    report.write_text(loop_markdown(results, stages, cards, data_card, meta))
    summary_cards = {
        name: {
            k: getattr(card, k)
            for k in ("train_rows", "rows_by_kind", "steps", "seconds", "first_loss", "final_loss", "eval_loss")
        }
        for name, card in cards.items()
    }
    (out / "summary.json").write_text(
        json.dumps(
            {
                "stages_s": stages,
                "cards": {**summary_cards, **({"data": data_card} if data_card else {})},
                "meta": meta,
                "results": {
                    name: [
                        {"program": r.program, "backend": r.backend, **metric_values(r.overall, r.run)} for r in runs
                    ]
                    for name, runs in results.items()
                },
            },
            indent=1,
        )
    )
    return report
