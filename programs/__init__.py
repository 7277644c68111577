"""Ready judges built from the core parts: GenRM, ReflectRM, ranking, ensembles and cascades.

Every program is a ``dspy.Module`` returning a :class:`reflectagent.Judgment`; compile it
with DSPy optimisers (:mod:`reflectagent.programs.compile`), save it with ``.save(path)``
and load it with :func:`load_program` (or ``GenRM.load(path)``).
"""

from __future__ import annotations

import json
from pathlib import Path

from reflectagent.config import ConfigError
from reflectagent.judge import Judge, PositionSwapJudge, ProgramFileError
from reflectagent.programs.compose import Cascade, Ensemble
from reflectagent.programs.genrm import GenRM
from reflectagent.programs.peer import MTBenchJudge
from reflectagent.programs.pointwise import PointwiseJudge
from reflectagent.programs.ranking import Ranking, arank, best_of_n, bradley_terry, rank
from reflectagent.programs.reflectrm import AdaptiveReflectRM, ReflectRM

PROGRAMS: dict[str, type[Judge]] = {
    cls.__name__: cls for cls in (GenRM, ReflectRM, AdaptiveReflectRM, PositionSwapJudge, MTBenchJudge, PointwiseJudge, Ensemble, Cascade)
}


NAMED = {
    "swap": lambda: PositionSwapJudge(),
    "genrm": lambda: GenRM(),
    "genrm-both": lambda: GenRM(both_orders=True),
    "genrm-prob": lambda: GenRM(both_orders=True, decision="probability"),
    "direct-prob": lambda: GenRM(both_orders=True, decision="probability", rationale=False),
    "reflectrm": lambda: ReflectRM(),
    "reflectrm-prob": lambda: ReflectRM(decision="probability"),
    "reflectrm-adaptive": lambda: AdaptiveReflectRM(),
    "reflectrm-adaptive-prob": lambda: AdaptiveReflectRM(decision="probability"),
    "pointwise": lambda: PointwiseJudge(decision="vote"),
    "pointwise-prob": lambda: PointwiseJudge(),  # each response rated alone, by expected rating
    "assess-prob": lambda: PointwiseJudge(rationale=True),  # the same after a written assessment of each
    # both probability readings of the same model, averaged: the surer one settles a disagreement
    "direct+pointwise-prob": lambda: Ensemble([(named_program("direct-prob"), None), (named_program("pointwise-prob"), None)],
                                              decision="probability"),
    "mtbench": lambda: MTBenchJudge(),  # the peer baseline: MT-Bench's prompt, both orders
}


def named_program(name: str) -> Judge:
    """A ready program by short name (the CLI's ``--program``): see ``NAMED``."""
    try:
        return NAMED[name]()
    except KeyError:
        raise ConfigError(f"unknown program {name!r}; choose from {', '.join(NAMED)}") from None


def program_class(name: str) -> type[Judge]:
    try:
        return PROGRAMS[name]
    except KeyError:
        raise ProgramFileError(f"unknown program {name!r}; known: {', '.join(sorted(PROGRAMS))}") from None


def load_program(path: str | Path) -> Judge:
    """Load any saved program, whichever class it is."""
    try:
        name = json.loads(Path(path).read_text(encoding="utf-8"))["reflectagent"]["program"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProgramFileError(f"{path} is not a saved reflectagent program: {exc}") from exc
    return program_class(name).load(path)


__all__ = [
    "AdaptiveReflectRM", "Cascade", "Ensemble", "GenRM", "MTBenchJudge", "PointwiseJudge", "PositionSwapJudge", "Ranking", "ReflectRM",
    "arank", "best_of_n", "bradley_terry", "load_program", "named_program", "program_class", "rank",
]
