"""Ready judges built from the core parts: GenRM, ReflectRM, ranking, ensembles, cascades, calibration and escalation.

Every program is a ``dspy.Module`` returning a :class:`reflectagent.Judgment`; compile it
with DSPy optimisers (:mod:`reflectagent.programs.compile`), save it with ``.save(path)``
and load it with :func:`load_program` (or ``GenRM.load(path)``).
"""

from __future__ import annotations

import json
from pathlib import Path

from reflectagent.calling.config import ConfigError
from reflectagent.judging.base import Judge, ProgramFileError
from reflectagent.judging.position_swap import PositionSwapJudge
from reflectagent.programs.calibration import Calibrated, Calibration, calibrate
from reflectagent.programs.compose import Cascade, Ensemble
from reflectagent.programs.escalating import EscalatingJudge, choose_threshold
from reflectagent.programs.genrm import GenRM
from reflectagent.programs.peer import MTBenchJudge
from reflectagent.programs.pointwise import PointwiseJudge
from reflectagent.programs.ranking import Ranking, arank, best_of_n, bradley_terry, rank
from reflectagent.programs.reflectrm import AdaptiveReflectRM, ReflectRM

PROGRAMS: dict[str, type[Judge]] = {
    cls.__name__: cls
    for cls in (
        GenRM,
        ReflectRM,
        AdaptiveReflectRM,
        PositionSwapJudge,
        MTBenchJudge,
        PointwiseJudge,
        Ensemble,
        Cascade,
        Calibrated,
        EscalatingJudge,
    )
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
    "direct+pointwise-prob": lambda: Ensemble(
        [(named_program("direct-prob"), None), (named_program("pointwise-prob"), None)], decision="probability"
    ),
    "mtbench": lambda: MTBenchJudge(),  # the peer baseline: MT-Bench's prompt, both orders
    # direct-prob, climbing to analyses, more samples and reflection while in doubt; "escalating-prob:0.2" sets the threshold
    "escalating-prob": lambda: EscalatingJudge(),
}
THRESHOLDED = {"escalating-prob"}  # named programs that take ":THRESHOLD"


def named_program(name: str) -> Judge:
    """A ready program by short name (the CLI's ``--program``): see ``NAMED``; ``escalating-prob:T`` sets its
    threshold to T (so one eval can draw its accuracy-against-cost curve)."""
    base, _, threshold = name.partition(":")
    if base not in NAMED or (threshold and base not in THRESHOLDED):
        raise ConfigError(
            f"unknown program {name!r}; choose from {', '.join(NAMED)} "
            f"(and {', '.join(f'{n}:THRESHOLD' for n in sorted(THRESHOLDED))})"
        )
    program = NAMED[base]()
    if threshold:
        try:
            return program.with_threshold(float(threshold))
        except ValueError as exc:
            raise ConfigError(f"{name!r}: the threshold after ':' is a number in [0, 1] ({exc})") from None
    return program


def resolve_program(name_or_path: str) -> Judge:
    """A named program, or a program saved by ``.save`` (a calibrated one, say) given by its file's path."""
    if name_or_path.endswith(".json") and Path(name_or_path).is_file():
        return load_program(name_or_path)
    return named_program(name_or_path)


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
    "AdaptiveReflectRM",
    "Calibrated",
    "Calibration",
    "Cascade",
    "Ensemble",
    "EscalatingJudge",
    "GenRM",
    "MTBenchJudge",
    "PointwiseJudge",
    "PositionSwapJudge",
    "Ranking",
    "ReflectRM",
    "arank",
    "best_of_n",
    "bradley_terry",
    "calibrate",
    "choose_threshold",
    "load_program",
    "named_program",
    "program_class",
    "rank",
    "resolve_program",
]
