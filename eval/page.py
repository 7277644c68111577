"""One self-contained HTML page per eval run or judgments file: see what a judge did, and why.

The page holds the summary table with intervals, the plots (inlined), a table of pairs filterable by
run, source, category, outcome, disagreement between presentations and parse failures, and a
drill-down per pair with the prompt, both responses, every analysis, reflection and rating with its
order, verdict and probability, the notes and the cost, side by side for every run. It works from the
file system with no network: styles, script, data and plots are inside it. The data is embedded once,
as JSON that Jinja2's ``tojson`` makes safe inside a script element, and the page's script writes
every text from it with ``textContent``: responses are untrusted input and show as text.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from reflectagent.errors import ReflectAgentError
from reflectagent.eval.metrics import summarize_judgments
from reflectagent.eval.report import METRICS, format_ci, format_value, load_report, load_runs, metric_values
from reflectagent.records.pairs import Pair, parse_pair
from reflectagent.records.results import Judgment, flip

JUDGMENTS_FILE = "judgments.jsonl.gz"  # every judgment of an eval run, beside report.json
PAGE_FILE = "report.html"
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("reflectagent.eval", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class PageError(ReflectAgentError, ValueError):
    """A folder or file the page cannot be built from, with what to give instead."""


@dataclass
class PageData:
    """What one page shows: runs (summary rows), pairs, and each run's judgments of each pair."""

    title: str
    description: str = ""
    columns: list[str] = field(default_factory=list)  # the summary table's metric names
    runs: list[dict[str, Any]] = field(default_factory=list)  # {"label", "program", "backend", "cells"}
    pairs: list[dict[str, Any]] = field(default_factory=list)
    judgments: list[list[Any]] = field(default_factory=list)  # [run index, pair index, [judgment per presentation]]
    plots: list[dict[str, str]] = field(default_factory=list)  # {"title", "src": data URI}

    def pair_index(self, pair: Pair) -> int:
        """The pair's row: one per id *and* text, so two pairs sharing an id (or both without one) never
        share a row, and two runs' judgments of the same pair do."""
        text = hashlib.sha256("\x00".join(pair.inputs().values()).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        key = (pair.id, text)
        if not hasattr(self, "_index"):
            self._index = {}
        if key not in self._index:
            self._index[key] = len(self.pairs)
            self.pairs.append(
                {
                    "id": pair.id or f"#{len(self.pairs) + 1}",
                    "prompt": pair.prompt,
                    "response_a": pair.response_a,
                    "response_b": pair.response_b,
                    "label": pair.label,
                    "source": pair.source or "",
                    "category": pair.category or "",
                }
            )
        return self._index[key]

    def add(self, run: int, pair: Pair, judgments: list[Judgment], swapped: list[bool]) -> None:
        self.judgments.append([run, self.pair_index(pair), [slim(j, s) for j, s in zip(judgments, swapped)]])

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "runs": self.runs,
            "pairs": self.pairs,
            "judgments": self.judgments,
        }


def slim(judgment: Judgment, swapped: bool) -> dict[str, Any]:
    """What the drill-down shows of one judgment, every verdict named in the pair's original order (a judgment
    of the swapped presentation is mapped back); raw output only where it did not parse."""

    def name(preference):
        return flip(preference) if swapped else preference

    def step(s) -> dict[str, Any]:
        row = {k: v for k, v in s.__dict__.items() if k not in ("raw", "usage", "cached", "truncated")}
        if "preference" in row:
            row["preference"] = name(row["preference"])
        if "swapped" in row:
            row["swapped"] = row["swapped"] != swapped  # the order the model saw, against the original
        if "response" in row:
            row["response"] = name(row["response"])
        row["raw"] = None if s.parsed else s.raw
        row["cost"] = {
            "calls": s.usage.lm_calls,
            "tokens": s.usage.prompt_tokens + s.usage.completion_tokens,
            "seconds": round(s.usage.latency_s, 2),
            "cached": s.cached,
        }
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}

    cost = judgment.cost
    probability_a = judgment.probability_a
    if probability_a is not None and swapped:
        probability_a = 1 - probability_a
    return {
        "presentation": "swapped" if swapped else "as given",
        "preference": name(judgment.preference),
        "reason": judgment.reason,
        "probability_a": None if probability_a is None else round(probability_a, 4),
        "chosen": judgment.chosen,
        "notes": list(judgment.notes),
        "program": judgment.program,
        "decided_by": judgment.decided_by,
        "analyses": [step(a) for a in judgment.analyses],
        "reflections": [step(r) for r in judgment.reflections],
        "ratings": [step(r) for r in judgment.ratings],
        "parts": [slim(p, swapped) for p in judgment.parts],
        "unparsed_steps": sum(not s.parsed for s in judgment.steps),
        "cost": {
            "calls": cost.lm_calls,
            "tokens": cost.prompt_tokens + cost.completion_tokens,
            "seconds": round(cost.latency_s, 2),
            "cache_hits": judgment.cache_hits,
            "steps": len(judgment.steps),
        },
    }


def write_judgments(results, folder: Path) -> Path:
    """Every judgment of an eval (``RunResult.judgments``), one line per run and pair, gzipped."""
    path = folder / JUDGMENTS_FILE
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for result in results:
            for pair, straight, swapped in result.judgments:
                handle.write(
                    json.dumps(
                        {
                            "program": result.program,
                            "backend": result.backend,
                            "pair": pair.to_dict(),
                            "judgments": [straight.to_dict(), swapped.to_dict()],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    return path


def from_report(folder: str | Path, label: str = "") -> PageData:
    """A report folder written by ``write_report``: its summary, plots and judgments."""
    folder = Path(folder)
    if not (folder / "report.json").exists():
        raise PageError(f"{folder} holds no report.json: give an eval report folder or a judgments JSONL file")
    meta = load_report(folder)["meta"]
    data = PageData(
        title=f"Judge evaluation: {folder.name}",
        columns=[name for name, _, _ in METRICS],
        description=f"{meta.get('pairs', '?')} pairs from {', '.join(map(str, meta.get('data', [])))}; "
        "each judged as given and with A and B swapped.",
    )
    prefix = f"{label}: " if label else ""
    for (program, backend), (summary, stats) in load_runs(folder).items():
        values = metric_values(summary, stats)
        cells = []
        for name, _, fmt in METRICS:
            cell = format_value(values[name], fmt)
            if name == "accuracy":
                cell += format_ci(summary.accuracy.ci)
            elif name == "consistency":
                cell += format_ci(summary.consistency.ci)
            cells.append(cell)
        data.runs.append(
            {"label": f"{prefix}{program} @ {backend}", "program": program, "backend": backend, "cells": cells}
        )
    index = {(r["program"], r["backend"]): i for i, r in enumerate(data.runs)}
    path = folder / JUDGMENTS_FILE
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                run = index.get((row["program"], row["backend"]))
                if run is not None:
                    data.add(
                        run, parse_pair(row["pair"]), [Judgment.from_dict(j) for j in row["judgments"]], [False, True]
                    )
    for png in sorted((folder / "plots").glob("*.png")):
        data.plots.append(
            {
                "title": png.stem.replace("_", " "),
                "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode(),
            }
        )
    return data


def from_judgments_file(path: str | Path) -> PageData:
    """A file written by ``reflectagent judge -o``: one run, each pair as given."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((parse_pair(row["pair"]), Judgment.from_dict(row["judgment"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise PageError(f"{path}, line {number}: not a line of `reflectagent judge -o` ({exc})") from exc
    if not rows:
        raise PageError(f"{path} holds no judgments")
    program = rows[0][1].program or "judge"
    summary = summarize_judgments([p for p, _ in rows], [j for _, j in rows])
    accuracy = summary.accuracy
    data = PageData(
        title=f"Judgments: {path.name}",
        description=f"{len(rows)} pairs, each judged as given.",
        columns=["verdicts", "accuracy", "no verdict", "parse failures", "LM calls"],
    )
    data.runs.append(
        {
            "label": program,
            "program": program,
            "backend": "",
            "cells": [
                str(summary.verdicts),
                "n/a" if accuracy is None else f"{accuracy:.1%}",
                str(sum(summary.no_verdict.values())),
                f"{summary.unparsed_steps} of {summary.steps} steps",
                str(summary.lm_calls),
            ],
        }
    )
    for pair, judgment in rows:
        data.add(0, pair, [judgment], [False])
    return data


def merge(before: PageData, after: PageData) -> PageData:
    """Two runs' pages as one, matched by pair id: a filter then shows where they disagree."""
    merged = PageData(
        title=f"{before.title} against {after.title}",
        columns=before.columns,
        description=f"before: {before.description} after: {after.description}",
        plots=before.plots + after.plots,
    )
    for page, name in ((before, "before"), (after, "after")):
        offset = len(merged.runs)
        merged.runs += [{**r, "label": f"{name}: {r['label']}"} for r in page.runs]
        for run, index, judgments in page.judgments:
            row = page.pairs[index]
            pair = parse_pair({**row, "id": None if row["id"].startswith("#") else row["id"]})
            merged.judgments.append([run + offset, merged.pair_index(pair), judgments])
    return merged


def render(data: PageData) -> str:
    return _TEMPLATES.get_template("report.html.j2").render(data=data, payload=data.to_json())


def write_page(data: PageData, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render(data), encoding="utf-8")
    return path


def view(source: str | Path, against: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write the page for a report folder or judgments file (and optionally a second one to compare)."""

    def load(where: Path) -> PageData:
        if where.is_dir():
            return from_report(where)
        if where.is_file():
            return from_judgments_file(where)
        raise PageError(f"{where} does not exist: give an eval report folder or a `reflectagent judge -o` file")

    source = Path(source)
    data = load(source)
    if against is not None:
        data = merge(data, load(Path(against)))
    default = source / PAGE_FILE if source.is_dir() and against is None else source.with_suffix(".html")
    return write_page(data, out or default)
