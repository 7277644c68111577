"""reflectagent: generative reward models (LLM judges that analyse before they decide).

    import reflectagent as ra
    with ra.backend("embedded"):
        judgment = ra.PositionSwapJudge().judge(ra.Pair(prompt, response_a, response_b))

The names below are loaded on first use, so importing a small part (``reflectagent.errors``,
the command line's entry point) does not load DSPy and LiteLLM first.

The core is grouped by idea, each group a layer that imports only those before it
(``tests/test_architecture.py`` checks it): ``records`` (pairs, results, files), ``serving``
(local models and vLLM servers), ``calling`` (settings, backends, the cache, the one step call),
``judging`` (signatures, modules, the judge). The flat names the modules had before
(``reflectagent.backends``, ``reflectagent.steps`` ...) still import, as the very same modules.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Where each module of the flat core went: ``reflectagent.<old>`` is ``reflectagent.<group>.<old>``.
MOVED = {
    **dict.fromkeys(("output", "pairs", "reading", "results", "splits", "teacher"), "records"),
    **dict.fromkeys(("embedded", "models", "presets", "server", "tokens"), "serving"),
    **dict.fromkeys(
        ("adapter", "backends", "cache", "concurrency", "config", "pool", "steps", "vllm_client"), "calling"
    ),
    **dict.fromkeys(("judge", "modules", "signatures"), "judging"),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import reflectagent.steps`` (and ``from reflectagent.steps import run_step``, ``monkeypatch.setattr(
    "reflectagent.steps.x", ...)``, a pickle naming it) gives the module where it lives now, loaded on first use:
    the SAME module object under both names, so a change made through one is seen through the other."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self.target(spec.name))
        spec.loader_state = module.__spec__  # the import system now sets the old name's spec on the module...
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # ...which keeps its own (its name, its file: reload, pickle)

    @staticmethod
    def target(fullname: str) -> str:
        name = fullname.rpartition(".")[2]
        return f"{__name__}.{MOVED[name]}.{name}"


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())

_EXPORTS = {
    "reflectagent.calling.backends": ("Backend", "BackendLM", "backend", "resolve_backend"),
    "reflectagent.calling.cache": ("JudgmentCache", "current_cache", "use_cache"),
    "reflectagent.calling.config": ("BackendConfig", "ConfigError", "OverrideError", "Settings", "load_settings"),
    "reflectagent.errors": ("ReflectAgentError",),
    "reflectagent.judging.base": ("Judge",),
    "reflectagent.judging.position_swap": ("PositionSwapJudge",),
    "reflectagent.judging.runs": ("judge_pairs",),
    "reflectagent.judging.modules": ("Analyzer", "Rater", "Reflector", "VerdictStep"),
    "reflectagent.records.pairs": ("BadLine", "InvalidPair", "Pair", "read_pairs"),
    "reflectagent.records.results": ("Analysis", "Judgment", "Rating", "Reflection", "Usage"),
    "reflectagent.judging.signatures": ("Analyze", "Assess", "Prefer", "Rate", "Reflect", "Verdict"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
# Spelled out so linters and readers see the names; tests/test_architecture.py checks it equals _WHERE and "pairs".
__all__ = [
    "Analysis",
    "Analyze",
    "Analyzer",
    "Assess",
    "Backend",
    "BackendConfig",
    "BackendLM",
    "BadLine",
    "ConfigError",
    "InvalidPair",
    "Judge",
    "Judgment",
    "JudgmentCache",
    "OverrideError",
    "Pair",
    "PositionSwapJudge",
    "Prefer",
    "Rate",
    "Rater",
    "Rating",
    "Reflect",
    "ReflectAgentError",
    "Reflection",
    "Reflector",
    "Settings",
    "Usage",
    "Verdict",
    "VerdictStep",
    "backend",
    "current_cache",
    "judge_pairs",
    "load_settings",
    "pairs",
    "read_pairs",
    "resolve_backend",
    "use_cache",
]


def __getattr__(name: str):
    if name in MOVED:  # ``reflectagent.pairs`` (exported), ``reflectagent.config`` ...: the module, as an attribute too
        return importlib.import_module(f"{__name__}.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reflectagent' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # what editors and type checkers see
    from reflectagent.calling.backends import Backend, BackendLM, backend, resolve_backend
    from reflectagent.calling.cache import JudgmentCache, current_cache, use_cache
    from reflectagent.calling.config import BackendConfig, ConfigError, OverrideError, Settings, load_settings
    from reflectagent.errors import ReflectAgentError
    from reflectagent.judging.base import Judge
    from reflectagent.judging.position_swap import PositionSwapJudge
    from reflectagent.judging.runs import judge_pairs
    from reflectagent.judging.modules import Analyzer, Rater, Reflector, VerdictStep
    from reflectagent.judging.signatures import Analyze, Assess, Prefer, Rate, Reflect, Verdict
    from reflectagent.records import pairs
    from reflectagent.records.pairs import BadLine, InvalidPair, Pair, read_pairs
    from reflectagent.records.results import Analysis, Judgment, Rating, Reflection, Usage
