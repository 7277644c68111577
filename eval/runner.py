"""Run judges over the same pairs, each pair in both presentations, and summarise each run.

A run is one judge on one LM under the labels the report shows (:class:`EvalRun`); the
common case, every named program on every configured backend, is :func:`program_runs`.
All judgments go through the judgment cache, so an interrupted run resumes where it
stopped and its final report equals an uninterrupted one: the report holds only what the
judgments themselves determine (verdicts, steps, their original cost); what depends on the
run (wall time, cache hits) is kept apart in :class:`RunStats`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import dspy

from reflectagent.calling.backends import resolve_backend
from reflectagent.calling.concurrency import run_sync
from reflectagent.calling.config import Settings
from reflectagent.eval.metrics import Record, Summary, summarize, summarize_by_category
from reflectagent.judging.base import Judge
from reflectagent.judging.runs import judge_all
from reflectagent.programs import named_program
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment


@dataclass(frozen=True)
class EvalRun:
    """One judge on one LM. ``lm`` None: the judge makes no LM call (a scalar reward model)."""

    program: str  # the labels of the report's row
    backend: str
    judge: Judge
    lm: dspy.BaseLM | None = None


@dataclass(frozen=True)
class RunStats:
    """Facts of one execution, not of the judgments: they differ between a cold and a warm run."""

    wall_s_all_runs: float  # every run of the call together: they share one pool
    lm_calls_made: int
    cache_hits: int
    judgments: int
    lm_seconds_per_verdict: float | None  # step latencies, when each step was made, summed per verdict

    @classmethod
    def of(cls, judgments: list[Judgment], wall_s: float) -> RunStats:
        return cls(
            wall_s_all_runs=wall_s,
            lm_calls_made=sum(j.lm_calls for j in judgments),
            cache_hits=sum(j.cache_hits for j in judgments),
            judgments=len(judgments),
            lm_seconds_per_verdict=sum(j.cost.latency_s for j in judgments) / len(judgments) if judgments else None,
        )


@dataclass
class RunResult:
    """One run: per-pair records and their metrics."""

    program: str
    backend: str
    records: list[Record]
    overall: Summary
    by_category: dict[str, Summary]
    by_source: dict[str, Summary]
    run: RunStats | None = None
    judgments: list[tuple[Pair, Judgment, Judgment]] = field(
        default_factory=list, repr=False
    )  # (pair, as given, swapped)

    def to_dict(self) -> dict[str, Any]:
        """The reproducible part (report.json); ``run`` goes to run.json."""
        return {
            "program": self.program,
            "backend": self.backend,
            "overall": self.overall.to_dict(),
            "by_category": {k: v.to_dict() for k, v in self.by_category.items()},
            "by_source": {k: v.to_dict() for k, v in self.by_source.items()},
            "records": [r.to_dict() for r in self.records],
        }

    def run_dict(self) -> dict[str, Any]:
        return {"program": self.program, "backend": self.backend, **(asdict(self.run) if self.run else {})}


def program_runs(
    programs: dict[str, Judge] | list[str], backends: list[str], settings: Settings | None = None
) -> list[EvalRun]:
    """Every program (by name, or named judges) on every backend (a server is started at the first uncached step)."""
    if isinstance(programs, list):
        programs = {name: named_program(name) for name in programs}
    lms = {name: resolve_backend(name, settings) for name in backends}
    return [EvalRun(prog, back, judge, lms[back]) for prog, judge in programs.items() for back in backends]


def run_eval(
    pairs: list[Pair],
    runs: list[EvalRun] | dict[str, Judge] | list[str],
    backends: list[str] | None = None,
    *,
    settings: Settings | None = None,
    concurrency: int = 8,
    no_verdict: Literal["wrong", "half"] = "wrong",
    progress: bool = True,
) -> list[RunResult]:
    """Judge ``pairs`` (as given and swapped) in every run; return their results.

    ``runs`` are :class:`EvalRun`s, or programs (names or named judges) to run on every one
    of ``backends``.
    """
    if backends is not None:
        runs = program_runs(runs, backends, settings)
    tasks = [(k, index, swapped) for k in range(len(runs)) for index in range(len(pairs)) for swapped in (False, True)]

    async def work(task) -> Judgment:
        k, index, swapped = task
        pair = pairs[index].swapped() if swapped else pairs[index]
        if runs[k].lm is None:
            return await runs[k].judge.ajudge(pair)
        with dspy.context(lm=runs[k].lm):
            return await runs[k].judge.ajudge(pair)

    started = time.perf_counter()
    done = run_sync(
        judge_all([(lambda t=t: work(t)) for t in tasks], concurrency=concurrency, progress=progress, desc="eval")
    )
    judgments: dict[tuple, Judgment] = dict(zip(tasks, done))
    wall = time.perf_counter() - started

    categories = sorted({p.category or "" for p in pairs})
    results = []
    for k, run in enumerate(runs):
        records = [
            Record.from_judgments(pair, judgments[(k, i, False)], judgments[(k, i, True)])
            for i, pair in enumerate(pairs)
        ]
        results.append(
            RunResult(
                program=run.program,
                backend=run.backend,
                records=records,
                overall=summarize(records, no_verdict),
                by_category=summarize_by_category(records, categories, no_verdict),
                by_source=summarize_by_category([replace(r, category=r.source) for r in records], None, no_verdict),
                run=RunStats.of([judgments[(k, i, s)] for i in range(len(pairs)) for s in (False, True)], wall),
                judgments=[(pair, judgments[(k, i, False)], judgments[(k, i, True)]) for i, pair in enumerate(pairs)],
            )
        )
    return results
