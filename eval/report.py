"""Reports a reviewer can check: a markdown table, every number and record in JSON, plots, and a page.

``report.json`` holds the per-pair records and every metric (each run's accuracy paired
against a baseline run's included), so any number can be recomputed; ``run.json`` holds
what differs between runs (wall time, calls made, cache hits); ``plots/`` shows accuracy
per category, accuracy against cost per verdict (runs of one program at several thresholds,
``escalating-prob:T``, joined as a curve) and the reliability diagram of every run's P(A);
``judgments.jsonl.gz`` holds every judgment and ``report.html`` shows them (:mod:`reflectagent.eval.page`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reflectagent.eval.metrics import Summary, paired_difference
from reflectagent.eval.runner import RunResult, RunStats

Metric = tuple[str, Callable[[Summary, "RunStats | None"], Any], str]  # (label, value of a run, format)
METRICS: tuple[Metric, ...] = (
    ("accuracy", lambda s, run: s.accuracy.value, "{:.1%}"),
    ("consistency", lambda s, run: s.consistency.value, "{:.1%}"),
    ("picks first both times", lambda s, run: s.position_bias.first.value, "{:.1%}"),
    ("picks second both times", lambda s, run: s.position_bias.second.value, "{:.1%}"),
    ("no verdict", lambda s, run: s.no_verdict.value, "{:.1%}"),
    ("ECE", lambda s, run: s.calibration.ece if s.calibration else None, "{:.3f}"),
    ("parse failures", lambda s, run: s.parse_failures.value, "{:.1%}"),
    ("LM calls / verdict", lambda s, run: s.cost_per_verdict.lm_calls, "{:.2f}"),
    ("tokens / verdict", lambda s, run: s.cost_per_verdict.tokens, "{:.0f}"),
    ("LM s / verdict", lambda s, run: run.lm_seconds_per_verdict if run else None, "{:.1f}"),
)


def metric_values(overall: Summary, run: RunStats | None = None) -> dict[str, float | None]:
    return {label: value(overall, run) for label, value, _ in METRICS}


def format_value(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_ci(interval) -> str:
    return f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else ""


def no_verdict_rule(results: list[RunResult]) -> str:
    """How the runs scored a missing verdict, in words: 'wrong' or 'half'."""
    return "half" if results and results[0].overall.accuracy.no_verdict_counts_as == 0.5 else "wrong"


def summary_markdown(results: list[RunResult], meta: dict[str, Any]) -> str:
    """The report's head: one row per run with every metric, and how to read it."""
    lines = [
        "# Judge evaluation",
        "",
        f"Data: {', '.join(meta['data'])} ({meta['pairs']} pairs, split {meta['split']}, seed {meta['seed']}). "
        "Each pair is judged as given and with A and B swapped.",
        "",
    ]
    header = ["program", "backend", *[label for label, _, _ in METRICS]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        values = metric_values(r.overall, r.run)
        cells = [r.program, r.backend]
        for label, _, fmt in METRICS:
            cell = format_value(values[label], fmt)
            if label == "accuracy":
                cell += format_ci(r.overall.accuracy.ci)
            elif label == "consistency":
                cell += format_ci(r.overall.consistency.ci)
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy: mean over both presentations of pairs labelled A/B; "
        f"no verdict counts as {0.5 if no_verdict_rule(results) == 'half' else 0.0}; "
        "ties are excluded (counted per run in report.json). 95% intervals: bootstrap over pairs "
        "(accuracy), Wilson (rates). Calls and tokens are what each verdict took to produce, cached or not; "
        "LM s / verdict sums the latency of its steps, server queueing included (a fact of the run: run.json). "
        "ECE: expected calibration error of P(A better) over both presentations, 10 equal-width bins "
        "(plots/reliability.png); n/a where a run gives no P(A).",
        "",
    ]
    stats = [r.run for r in results if r.run is not None]
    if stats:
        total = sum(s.judgments for s in stats)
        made = sum(s.lm_calls_made for s in stats)
        hits = sum(s.cache_hits for s in stats)
        # the runs of one run_eval call share its wall time (one pool); a bench that runs one program per call
        # (so an interrupted bench keeps whole runs) has a wall time per call: count each call's once
        wall = sum(set(s.wall_s_all_runs for s in stats))
        lines += [
            f"Run: {total} judgments in {wall:.0f} s ({60 * total / wall:.1f} judgments per minute, all programs "
            f"together); {made} LM calls made, {hits} steps from the cache."
            if wall
            else "",
            "",
        ]
    return "\n".join(lines)


def split_baseline(name: str) -> tuple[str, str]:
    """'program' or 'program@backend' (spaces around '@' allowed) -> (program, backend or '')."""
    program, _, backend = (part.strip() for part in name.partition("@"))
    return program, backend


def baseline_run(results: list[RunResult], name: str | None = None) -> RunResult | None:
    """The run the others are paired against: ``name`` ('program' or 'program@backend'; the first such run),
    else the first run; None with fewer than two runs."""
    if len(results) < 2:
        return None
    if name is None:
        return results[0]
    program, backend = split_baseline(name)
    for r in results:
        if r.program == program and backend in ("", r.backend):
            return r
    raise ValueError(
        f"baseline {name!r} is none of the runs: {', '.join(f'{r.program} @ {r.backend}' for r in results)}"
    )


def paired_comparison(results: list[RunResult], name: str | None = None) -> dict[str, Any] | None:
    """Each run's accuracy minus the baseline run's (:func:`baseline_run`) on the same pairs, as report.json holds it;
    None with fewer than two runs."""
    baseline = baseline_run(results, name)
    if baseline is None:
        return None
    rule = no_verdict_rule(results)
    return {
        "baseline": {"program": baseline.program, "backend": baseline.backend},
        "runs": [
            {"program": r.program, "backend": r.backend, **asdict(paired_difference(r.records, baseline.records, rule))}
            for r in results
            if r is not baseline
        ],
    }


def paired_markdown(paired: dict[str, Any] | None) -> list[str]:
    """Markdown lines: each run's accuracy minus the baseline's on the same pairs, with the paired interval."""
    if paired is None:
        return []
    baseline = paired["baseline"]
    lines = [
        f"## Paired against {baseline['program']} @ {baseline['backend']}",
        "",
        "Accuracy minus the baseline's over the pairs both scored, pair by pair; 95% bootstrap over those pairs. "
        "An interval that excludes 0 says the run beat (or lost to) the baseline on these pairs.",
        "",
        "| program | backend | accuracy minus baseline | pairs |",
        "|---|---|---|---|",
    ]
    for run in paired["runs"]:
        value, ci = run["value"], run["ci"]
        cell = (
            "n/a"
            if value is None
            else f"{100 * value:+.1f} pts" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")
        )
        lines.append(f"| {run['program']} | {run['backend']} | {cell} | {run['n']} |")
    return lines + [""]


def markdown(results: list[RunResult], meta: dict[str, Any], paired: dict[str, Any] | None = None) -> str:
    """report.md; ``paired`` is :func:`paired_comparison`'s result (write_report computes it once for both files)."""
    lines = [summary_markdown(results, meta)]
    lines += paired_markdown(paired)
    lines += group_table("source", results, lambda r: r.by_source, with_consistency=True)
    lines += group_table("category", results, lambda r: r.by_category)
    lines += [
        "",
        "![accuracy per category](plots/accuracy_by_category.png)",
        "![accuracy against cost](plots/accuracy_vs_cost.png)",
        "![reliability of P(A)](plots/reliability.png)",
        "",
    ]
    return "\n".join(lines)


def group_table(name: str, results: list[RunResult], groups, with_consistency: bool = False) -> list[str]:
    """Markdown lines: accuracy (and consistency) per ``name`` for every run, side by side."""
    keys = sorted({key for r in results for key in groups(r)})
    lines = [
        f"## Accuracy per {name}",
        "",
        f"| {name} | " + " | ".join(f"{r.program} @ {r.backend}" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for key in keys:
        cells = []
        for r in results:
            summary = groups(r).get(key)
            if summary is None:
                cells.append("n/a")
                continue
            acc = summary.accuracy
            cell = format_value(acc.value, "{:.0%}")
            if with_consistency:
                cell += f"{format_ci(acc.ci)}, consistency {format_value(summary.consistency.value, '{:.0%}')}"
            cells.append(cell + f" (n={acc.n})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines + [""]


def accuracy_axis_label(results: list[RunResult]) -> str:
    return f"accuracy (both presentations; no verdict = {no_verdict_rule(results)})"


def plot(results: list[RunResult], folder: Path, max_categories: int = 20) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    sizes: dict[str, int] = {}
    for r in results:
        for category, summary in r.by_category.items():
            sizes[category] = max(sizes.get(category, 0), summary.accuracy.n)
    categories = sorted(sizes, key=lambda c: (-sizes[c], c))[:max_categories][::-1]  # largest at the top
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(categories) * max(len(results), 1) + 1.5))
    height = 0.8 / max(len(results), 1)
    for k, r in enumerate(results):
        # a run over a subset of the pairs may lack a category: no bar rather than a false zero
        values = [r.by_category[c].accuracy.value if c in r.by_category else None for c in categories]
        values = [float("nan") if v is None else v for v in values]
        ax.barh(
            [i + k * height for i in range(len(categories))], values, height=height, label=f"{r.program} @ {r.backend}"
        )
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(categories))])
    ax.set_yticklabels([f"{c} (n={sizes[c]})" for c in categories])
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel(accuracy_axis_label(results))
    ax.set_title(f"Accuracy per category ({len(categories)} largest)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths.append(folder / "accuracy_by_category.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    lines = curves(results)
    shown = 0
    for r in results:
        acc, calls = r.overall.accuracy, r.overall.cost_per_verdict.lm_calls
        on_a_line = (r.program.partition(":")[0], r.backend) in lines and not math.isnan(_threshold(r.program))
        if acc.value is None or calls is None or on_a_line:
            continue
        low, high = acc.ci or (acc.value, acc.value)
        ax.errorbar(calls, acc.value, yerr=[[acc.value - low], [high - acc.value]], fmt="o", capsize=4, alpha=0.8)
        ax.annotate(
            f"{r.program} @ {r.backend}",
            (calls, acc.value),
            textcoords="offset points",
            xytext=(6, 4 + 11 * (shown % 4)),
            fontsize=8,
        )  # staggered: programs often share a point
        shown += 1
    for (
        program,
        backend,
    ), points in lines.items():  # one program at several thresholds: a curve, each point its threshold
        (line,) = ax.plot(
            [x for x, _, _ in points],
            [y for _, y, _ in points],
            "s-",
            markersize=4,
            linewidth=1.5,
            label=f"{program} @ {backend}",
        )
        for x, y, t in points:
            ax.annotate(
                f"{t:g}", (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7, color=line.get_color()
            )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("LM calls per verdict (one pair, one presentation)")
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title("Accuracy against cost")
    if lines:
        ax.legend(loc="lower right", fontsize=8, title="at several thresholds (labelled)", title_fontsize=8)
    fig.tight_layout()
    paths.append(folder / "accuracy_vs_cost.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for r in results:
        calibration = r.overall.calibration
        if calibration is None or not calibration.n:
            continue
        shown = [b for b in calibration.bins if b.count]
        ax.plot(
            [b.mean_probability for b in shown],
            [b.frequency for b in shown],
            "o-",
            markersize=4,
            label=f"{r.program} @ {r.backend}: ECE {calibration.ece:.3f} (n={calibration.n})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("P(A better), mean per bin of 0.1")
    ax.set_ylabel("share of those judgments where A is better")
    ax.set_title("Reliability of P(A)")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    paths.append(folder / "reliability.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _threshold(program: str) -> float:
    """T of a run labelled ``NAME:T``; NaN for any other label."""
    try:
        return float(program.partition(":")[2])
    except ValueError:
        return float("nan")


def curves(results: list[RunResult]) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """Runs of one program at several thresholds (``NAME:T`` on one backend, two or more of them): their
    (calls per verdict, accuracy, threshold) points by threshold, to draw as one curve."""
    groups: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in results:
        threshold = _threshold(r.program)
        acc, calls = r.overall.accuracy.value, r.overall.cost_per_verdict.lm_calls
        if not math.isnan(threshold) and acc is not None and calls is not None:
            groups.setdefault((r.program.partition(":")[0], r.backend), []).append((calls, acc, threshold))
    return {key: sorted(points, key=lambda p: (p[2], p[0])) for key, points in groups.items() if len(points) > 1}


def write_report(results: list[RunResult], folder: str | Path, meta: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paired = paired_comparison(results, meta.get("baseline"))
    (folder / "report.json").write_text(
        json.dumps({"meta": meta, "runs": [r.to_dict() for r in results], "paired": paired}, indent=1)
    )
    (folder / "run.json").write_text(json.dumps([r.run_dict() for r in results], indent=1))
    (folder / "report.md").write_text(markdown(results, meta, paired))
    plot(results, folder / "plots")
    from reflectagent.eval.page import PAGE_FILE, from_report, write_judgments, write_page  # the page reads this module

    if any(r.judgments for r in results):
        write_judgments(results, folder)
    else:  # results loaded without their judgments: an older file would show other judgments than these
        (folder / "judgments.jsonl.gz").unlink(missing_ok=True)
    write_page(from_report(folder), folder / PAGE_FILE)
    return folder


def load_report(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "report.json").read_text())


def load_runs(folder: str | Path) -> dict[tuple[str, str], tuple[Summary, RunStats | None]]:
    """(program, backend) -> the overall summary and run facts of a report folder."""
    stats = {}
    for row in json.loads((Path(folder) / "run.json").read_text()):
        key = (row.pop("program"), row.pop("backend"))
        stats[key] = RunStats(**row) if row else None
    return {
        (r["program"], r["backend"]): (Summary.from_dict(r["overall"]), stats.get((r["program"], r["backend"])))
        for r in load_report(folder)["runs"]
    }


def compare(before: str | Path, after: str | Path) -> str:
    """A markdown table of each metric's change from one report folder to another."""
    old, new = load_runs(before), load_runs(after)
    labels = [label for label, _, _ in METRICS]
    lines = ["| program | backend | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            lines.append(f"| {key[0]} | {key[1]} | only in {'after' if key in new else 'before'} |")
            continue
        a, b = metric_values(*old[key]), metric_values(*new[key])
        cells = []
        for label, _, fmt in METRICS:
            if a[label] is None or b[label] is None:
                cells.append("n/a")
            else:
                delta = b[label] - a[label]
                cells.append(
                    f"{format_value(b[label], fmt)} ({'+' if delta >= 0 else ''}{fmt.format(delta).replace('%', ' pt') if '%' in fmt else fmt.format(delta)})"
                )
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
