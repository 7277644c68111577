"""Hard examples from the judgment cache: the judge learns from its own doubts, with no new LM call.

Why: where a judge was unsure of a labelled pair, its judgment says where it needs teaching, and every
judgment an eval, a calibration, a ``finetune data`` run or a reward service made is already in the cache.
A doubt is one of:

- ``order_inconsistent``: the analyses of the two presentation orders lean apart (their P(A), else their
  votes; reflections aside), so the order shown decided, not the responses;
- ``low_margin``: the judgment's P(A) is within ``margin`` of 0.5.

Each labelled pair is judged again by the same program on the same backend under
:class:`~reflectagent.calling.cache.CacheOnly`, which answers every step the cache holds and refuses to make one:
the judgment is rebuilt from the cached steps through the cache's own API (the keys are the program's,
never recomputed here), and a pair whose steps are not all cached is counted and skipped. The doubtful
pairs then become STaR rows (the analyses that reached the label, in the order shown) and STaR-DPO
triples (a right and a wrong analysis of the same order), as :func:`build_unified_data` makes them, with no
rationalisation (that would call the teacher). Every mined row says where it came from: ``from_cache``
(True) and ``doubt`` (the doubts its judgment showed).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import dspy

from reflectagent.calling.cache import CacheOnly, JudgmentCache, NotCached, current_cache, use_cache
from reflectagent.calling.concurrency import run_sync
from reflectagent.calling.config import Settings
from reflectagent.finetune.data import DataConfig, Trace, UnifiedData, build_unified_data
from reflectagent.judging.base import Judge
from reflectagent.judging.runs import judge_all
from reflectagent.programs.escalating import analyses_disagree
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment

logger = logging.getLogger(__name__)

MARGIN = 0.1  # |P(A) - 0.5| under this is a low-margin judgment (escalation's default threshold)
DOUBTS = ("order_inconsistent", "low_margin")


def doubts(judgment: Judgment, margin: float = MARGIN) -> tuple[str, ...]:
    """The doubts ``judgment`` shows (see the module), in :data:`DOUBTS` order; empty for a confident one."""
    found = []
    if analyses_disagree(judgment):
        found.append("order_inconsistent")
    if judgment.probability_a is not None and abs(judgment.probability_a - 0.5) < margin:
        found.append("low_margin")
    return tuple(found)


@dataclass(frozen=True)
class Mined:
    """A labelled pair, its judgment rebuilt from the cache, and the doubts it shows."""

    pair: Pair
    judgment: Judgment
    doubts: tuple[str, ...]


@dataclass(frozen=True)
class Mining:
    """What mining found: the doubtful judgments, and how many pairs were confident or not (fully) cached."""

    mined: tuple[Mined, ...]
    confident: int
    not_cached: int
    unlabelled: int
    margin: float

    @property
    def counts(self) -> dict[str, int | float]:
        by_doubt = Counter(d for m in self.mined for d in m.doubts)
        return {
            "margin": self.margin,
            "pairs_doubtful": len(self.mined),
            **{f"pairs_{d}": by_doubt[d] for d in DOUBTS},
            "pairs_confident": self.confident,
            "pairs_not_cached": self.not_cached,
            "pairs_unlabelled_or_tied": self.unlabelled,
        }


async def _cached_judgment(program: Judge, pair: Pair) -> Judgment | None:
    try:
        return await program.ajudge(pair)
    except NotCached:
        return None


def mine_cache(
    pairs: list[Pair],
    program: Judge,
    lm: dspy.BaseLM,
    cache: JudgmentCache,
    *,
    margin: float = MARGIN,
    concurrency: int = 8,
    progress: bool = False,
) -> Mining:
    """Judge the A/B-labelled ``pairs`` with ``program`` on ``lm`` from ``cache`` alone, keeping those in doubt."""
    labelled = [p for p in pairs if p.label in ("A", "B")]
    jobs = [lambda pair=pair: _cached_judgment(program, pair) for pair in labelled]

    async def run() -> list[Judgment | None]:
        with use_cache(CacheOnly(cache)), dspy.context(lm=lm, trace=None):
            return await judge_all(jobs, concurrency=concurrency, progress=progress, desc="mining the cache")

    judgments = run_sync(run())
    mined, confident, not_cached = [], 0, 0
    for pair, judgment in zip(labelled, judgments):
        if judgment is None:
            not_cached += 1
            continue
        found = doubts(judgment, margin)
        if found:
            mined.append(Mined(pair, judgment, found))
        else:
            confident += 1
    logger.info(
        "mined %d doubtful judgments of %d labelled pairs (%d confident, %d not in the cache)",
        len(mined),
        len(labelled),
        confident,
        not_cached,
    )
    return Mining(tuple(mined), confident, not_cached, len(pairs) - len(labelled), margin)


def build_mined_data(mining: Mining, config: DataConfig | None = None, adapter=None, budget=None) -> UnifiedData:
    """STaR and STaR-DPO rows from the doubtful judgments (:func:`build_unified_data`, without rationalisation),
    each marked ``from_cache`` and with its ``doubt``; the data card counts what mining found."""
    config = replace(config or DataConfig(), rationalize=False)
    traces = [Trace(m.pair, m.judgment) for m in mining.mined]
    built = build_unified_data(traces, config, None, adapter=adapter, budget=budget)
    doubt_of: dict[str | None, set[str]] = {}
    for m in mining.mined:
        doubt_of.setdefault(m.pair.id, set()).update(m.doubts)
    for rows in (*built.splits.values(), *built.dpo.values()):
        for row in rows:
            row["from_cache"] = True
            row["doubt"] = [d for d in DOUBTS if d in doubt_of.get(row["pair_id"], ())]
    built.stats.update({"kind": "mined from the judgment cache", **mining.counts})
    return built


def mine(
    pairs: list[Pair],
    program: Judge,
    backend: str | None,
    settings: Settings,
    out: Path,
    config: DataConfig | None = None,
    *,
    margin: float = MARGIN,
    concurrency: int = 8,
    progress: bool = False,
    card: dict | None = None,
) -> UnifiedData:
    """Mine the cache in force (:func:`~reflectagent.calling.cache.current_cache`) for ``program``'s doubts on backend
    ``backend`` about ``pairs``, and save the rows into ``out``, rendered and cut as that backend is served (with
    ``traces.jsonl``: the mined judgments). Starts no server and makes no LM call; ``card`` adds to the data card."""
    from reflectagent.calling.backends import resolve_backend
    from reflectagent.finetune.traces import for_backend, save

    lm = resolve_backend(backend, settings)
    mining = mine_cache(
        pairs, program, lm, current_cache(lm), margin=margin, concurrency=concurrency, progress=progress
    )
    budget = lm.backend.input_budget() if (config or DataConfig()).context_chars is None else None
    built = build_mined_data(mining, for_backend(config, lm.backend), adapter=lm.backend.adapter(), budget=budget)
    built.stats.update({"mined_backend": lm.backend.name, **(card or {})})
    return save(built, [Trace(m.pair, m.judgment) for m in mining.mined], out)
