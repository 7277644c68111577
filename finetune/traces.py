"""Teacher traces: a judge program run over labelled train pairs, every analysis and reflection kept.

Any program on any backend can teach (a strong API model, a served Qwen3; here the embedded
model). ReflectRM with k samples gives analyses in both orders and reflections on the ones
that disagree; run it on a backend with temperature > 0 (sample 0 uses the backend's
temperature, the others the program's) so the samples differ. Every step goes through the
judgment cache, so an interrupted collection resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from reflectagent.config import Settings
from reflectagent.finetune.data import DataConfig, Trace, UnifiedData, build_unified_data
from reflectagent.judge import Judge, judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import ReflectRM


def collect_traces(pairs: list[Pair], program: Judge | None = None, *, samples: int = 4, temperature: float = 0.8,
                   concurrency: int = 8, progress: bool = True) -> list[Trace]:
    """Judge each labelled pair with ``program`` (default: ReflectRM with ``samples`` analyses)."""
    labelled = [p for p in pairs if p.label in ("A", "B")]
    program = program or ReflectRM(samples=samples, temperature=temperature)
    judgments = judge_pairs(program, labelled, concurrency=concurrency, progress=progress)
    return [Trace(pair, judgment) for pair, judgment in zip(labelled, judgments)]


def for_backend(config: DataConfig | None, backend) -> DataConfig:
    """``config`` (default: ``DataConfig()``) with the input budget of ``backend`` where it names none."""
    config = config or DataConfig()
    if config.context_chars is None:
        return dataclasses.replace(config, context_chars=backend.context_chars)
    return config


def distil(pairs: list[Pair], teacher: str | None, settings: Settings, out: Path, config: DataConfig | None = None, *,
           samples: int = 4, temperature: float = 0.8, concurrency: int = 8, progress: bool = True) -> UnifiedData:
    """Teacher traces on ``pairs`` with backend ``teacher``, then the unified data, saved into ``out``.

    The rows are rendered by the teacher backend's own adapter, and cut to its input budget unless
    ``config.context_chars`` says otherwise (:func:`for_backend`), so they match what that backend
    is served. ``teacher`` None is the configured default backend. ``out`` gets
    the datasets, the data card and ``traces.jsonl`` (every teacher analysis with its
    correctness, for reading; resuming goes through the cache).
    """
    from reflectagent.backends import backend
    from reflectagent.finetune.rationalize import Rationalizer

    with backend(teacher, settings) as lm:
        config = for_backend(config, lm.backend)
        traces = collect_traces(pairs, samples=samples, temperature=temperature, concurrency=concurrency,
                                progress=progress)
        built = build_unified_data(traces, config, Rationalizer() if config.rationalize else None,
                                   adapter=lm.backend.adapter(), concurrency=concurrency)
    out = Path(out)
    built.save(out)
    with open(out / "traces.jsonl", "w", encoding="utf-8") as handle:
        for t in traces:
            right = [a.parsed and a.preference == t.pair.label for a in t.judgment.analyses]
            handle.write(json.dumps({"pair": t.pair.to_dict(), "judgment": t.judgment.to_dict(),
                                     "analysis_correct": right}, ensure_ascii=False) + "\n")
    return built
