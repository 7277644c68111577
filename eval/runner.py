"""Run every program on every backend over the same pairs, each pair in both presentations.

All judgments go through the judgment cache, so an interrupted run resumes where it
stopped and its final report equals an uninterrupted one: the report holds only what the
judgments themselves determine (verdicts, steps, their original cost); what depends on the
run (wall time, cache hits) is kept apart in ``run``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import dspy
from tqdm.auto import tqdm

from reflectagent.backends import resolve_backend
from reflectagent.concurrency import map_unordered
from reflectagent.config import Settings
from reflectagent.eval.metrics import Record, summarize, summarize_by_category
from reflectagent.judge import Judge, RunInterrupted
from reflectagent.pairs import Pair
from reflectagent.programs import named_program

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One program on one backend: per-pair records and their metrics."""

    program: str
    backend: str
    records: list[Record]
    overall: dict[str, Any]
    by_category: dict[str, dict[str, Any]]
    by_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # wall time, calls made, cache hits: not reproducible

    def to_dict(self) -> dict[str, Any]:
        return {"program": self.program, "backend": self.backend, "overall": self.overall,
                "by_category": self.by_category, "by_source": self.by_source,
                "records": [r.to_dict() for r in self.records]}


def run_eval(
    pairs: list[Pair],
    programs: dict[str, Judge] | list[str],
    backends: list[str],
    *,
    settings: Settings | None = None,
    concurrency: int = 8,
    no_verdict: Literal["wrong", "half"] = "wrong",
    progress: bool = True,
) -> list[RunResult]:
    """Judge ``pairs`` (as given and swapped) with every program x backend; return the results."""
    if isinstance(programs, list):
        programs = {name: named_program(name) for name in programs}
    lms = {name: resolve_backend(name, settings) for name in backends}  # in this thread: servers start here
    categories = sorted({p.category or "" for p in pairs})
    tasks = [(prog, back, index, swapped) for prog in programs for back in backends
             for index in range(len(pairs)) for swapped in (False, True)]

    def work(task):
        prog, back, index, swapped = task
        pair = pairs[index]
        with dspy.context(lm=lms[back]):
            return programs[prog].judge(pair.swapped() if swapped else pair)

    judgments: dict[tuple, Any] = {}
    started = time.perf_counter()
    outcomes = map_unordered(work, tasks, max_workers=concurrency)
    with tqdm(total=len(tasks), desc="eval", unit="judgment", disable=not progress) as bar:
        try:
            for task, outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise RunInterrupted(len(judgments), len(tasks), outcome) from outcome
                judgments[task] = outcome
                bar.update()
        finally:
            outcomes.close()
    wall = time.perf_counter() - started

    results = []
    for prog in programs:
        for back in backends:
            records = [
                Record.from_judgments(pair, judgments[(prog, back, i, False)], judgments[(prog, back, i, True)])
                for i, pair in enumerate(pairs)
            ]
            mine = [judgments[(prog, back, i, s)] for i in range(len(pairs)) for s in (False, True)]
            results.append(RunResult(
                program=prog, backend=back, records=records,
                overall=summarize(records, no_verdict),
                by_category=summarize_by_category(records, categories, no_verdict),
                by_source=summarize_by_category([replace(r, category=r.source) for r in records], None, no_verdict),
                run={"wall_s_all_runs": wall, "lm_calls_made": sum(j.lm_calls for j in mine),
                     "cache_hits": sum(j.cache_hits for j in mine), "judgments": len(mine),
                     # when each step was made (now or in an earlier, interrupted run), summed per verdict
                     "lm_seconds_per_verdict": sum(j.cost.latency_s for j in mine) / len(mine) if mine else None},
            ))
    return results
