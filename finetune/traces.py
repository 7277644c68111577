"""Teacher traces: a judge program run over labelled train pairs, every analysis and reflection kept.

Any program on any backend can teach (a strong API model, a served Qwen3; here the embedded
model). ReflectRM with k samples gives analyses in both orders and reflections on the ones
that disagree; run it on a backend with temperature > 0 (sample 0 uses the backend's
temperature, the others the program's) so the samples differ. Every step goes through the
judgment cache, so an interrupted collection resumes.
"""

from __future__ import annotations

from reflectagent.finetune.data import Trace
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
