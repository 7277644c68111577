"""reflectagent: generative reward models (LLM judges that analyse before they decide).

    import reflectagent as ra
    with ra.backend("embedded"):
        judgment = ra.PositionSwapJudge().judge(ra.Pair(prompt, response_a, response_b))

The names below are loaded on first use, so importing a small part (``reflectagent.errors``,
the command line's entry point) does not load DSPy and LiteLLM first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "reflectagent.backends": ("Backend", "BackendLM", "backend", "resolve_backend"),
    "reflectagent.cache": ("JudgmentCache", "current_cache", "use_cache"),
    "reflectagent.config": ("BackendConfig", "ConfigError", "OverrideError", "Settings", "load_settings"),
    "reflectagent.errors": ("ReflectAgentError",),
    "reflectagent.judge": ("Judge", "PositionSwapJudge", "judge_pairs"),
    "reflectagent.modules": ("Analyzer", "Rater", "Reflector", "VerdictStep"),
    "reflectagent.pairs": ("BadLine", "InvalidPair", "Pair", "read_pairs"),
    "reflectagent.results": ("Analysis", "Judgment", "Rating", "Reflection", "Usage"),
    "reflectagent.signatures": ("Analyze", "Assess", "Prefer", "Rate", "Reflect", "Verdict"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
# Spelled out so linters and readers see the names; tests/test_architecture.py checks it equals _WHERE and "pairs".
__all__ = [
    "Analysis", "Analyze", "Analyzer", "Assess", "Backend", "BackendConfig", "BackendLM", "BadLine", "ConfigError",
    "InvalidPair", "Judge", "Judgment", "JudgmentCache", "OverrideError", "Pair", "PositionSwapJudge", "Prefer", "Rate",
    "Rater", "Rating", "Reflect", "ReflectAgentError", "Reflection", "Reflector", "Settings", "Usage", "Verdict",
    "VerdictStep", "backend", "current_cache", "judge_pairs", "load_settings", "pairs", "read_pairs", "resolve_backend",
    "use_cache",
]


def __getattr__(name: str):
    if name == "pairs":
        return importlib.import_module("reflectagent.pairs")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reflectagent' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # what editors and type checkers see
    from reflectagent import pairs
    from reflectagent.backends import Backend, BackendLM, backend, resolve_backend
    from reflectagent.cache import JudgmentCache, current_cache, use_cache
    from reflectagent.config import BackendConfig, ConfigError, OverrideError, Settings, load_settings
    from reflectagent.errors import ReflectAgentError
    from reflectagent.judge import Judge, PositionSwapJudge, judge_pairs
    from reflectagent.modules import Analyzer, Rater, Reflector, VerdictStep
    from reflectagent.pairs import BadLine, InvalidPair, Pair, read_pairs
    from reflectagent.results import Analysis, Judgment, Rating, Reflection, Usage
    from reflectagent.signatures import Analyze, Assess, Prefer, Rate, Reflect, Verdict
