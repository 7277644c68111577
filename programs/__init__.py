"""Ready judges built from the core parts (``reflectagent.programs``).

The published programs (GenRM, ReflectRM, ranking, ensembles) arrive with issue 4; the core
already ships :class:`reflectagent.judge.PositionSwapJudge`, re-exported here.
"""

from reflectagent.judge import PositionSwapJudge

__all__ = ["PositionSwapJudge"]
