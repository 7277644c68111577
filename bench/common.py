"""What the benches share: where the data is, the five sets, their test samples, and running a stage in its own process.

The test samples are the quality bench's: each set's test split (``reflectagent.splits``, seed 0), the
usable pairs (labelled A or B, two distinct non-empty responses, prompt plus responses within
``max_chars``) in a stable seeded order, ``per_source`` of them after ``skip``. Every bench that names
"the first sample" means these pairs, so their committed caches answer for each other.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from pathlib import Path

from reflectagent.eval import load_benchmark
from reflectagent.finetune.selection import usable
from reflectagent.pairs import Pair
from reflectagent.splits import split_pairs, stable_fraction

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = ("hh_rlhf_harmless_test", "hhh_alignment", "rmbench", "pandalm", "autoj_pairwise")
TEACHER = SHARED / "teacher" / "alpaca_eval_gpt4_turbo.jsonl"


def load_source(source: str) -> list[Pair]:
    return load_benchmark(SHARED / f"{source}.jsonl")[0]


def source_test_pairs(source: str, per_source: int, max_chars: int, skip: int = 0) -> list[Pair]:
    """One set's share of the quality bench's test sample."""
    test = split_pairs(load_source(source), seed=0)["test"]
    ordered = sorted((p for p in test if usable(p, max_chars)), key=lambda p: stable_fraction("quality-bench", p.id))
    return ordered[skip : skip + per_source]


def test_pairs(per_source: int, max_chars: int, skip: int = 0, sources: tuple[str, ...] = SOURCES) -> list[Pair]:
    """The quality bench's test sample: ``per_source`` pairs of each set, set after set."""
    return [pair for source in sources for pair in source_test_pairs(source, per_source, max_chars, skip)]


def log_to_stderr() -> None:
    """Each stage runs in a spawned process of its own, which starts with no logging set up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def in_own_process(target, *args) -> None:
    """Run ``target`` in a spawned process, so its memory is given back when it ends: a 1.5B in training,
    its merge and the same model served do not fit in 24 GB together (a merge was killed for memory when
    it ran in the training process)."""
    worker = multiprocessing.get_context("spawn").Process(target=target, args=args)
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        why = "killed, most likely for memory: is anything else running?" if worker.exitcode == -9 else "see above"
        raise SystemExit(
            f"{target.__name__} failed (exit code {worker.exitcode}: {why}); "
            "run the same command again: finished stages are kept"
        )
