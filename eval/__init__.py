"""Benchmarks, metrics and side-by-side reports for judges (``reflectagent.eval``).

from reflectagent.eval import load_benchmark, run_eval, write_report
pairs, bad = load_benchmark("pairs.jsonl")
results = run_eval(pairs, ["genrm", "reflectrm"], ["embedded"])
write_report(results, "reports/run1", meta={...})
"""

from reflectagent.eval.data import from_chosen_rejected, load_benchmark
from reflectagent.eval.metrics import (
    Difference,
    Record,
    bootstrap,
    paired_difference,
    summarize,
    summarize_by_category,
    wilson,
)
from reflectagent.eval.report import compare, load_report, write_report
from reflectagent.eval.runner import EvalRun, RunResult, RunStats, program_runs, run_eval
from reflectagent.records.splits import split_pairs

__all__ = [
    "Difference",
    "EvalRun",
    "Record",
    "RunResult",
    "RunStats",
    "bootstrap",
    "compare",
    "from_chosen_rejected",
    "load_benchmark",
    "load_report",
    "paired_difference",
    "program_runs",
    "run_eval",
    "split_pairs",
    "summarize",
    "summarize_by_category",
    "wilson",
    "write_report",
]
