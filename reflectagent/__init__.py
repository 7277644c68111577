"""reflectagent: generative reward models (LLM judges that analyse before they decide).

    import reflectagent as ra
    with ra.backend("embedded"):
        judgment = ra.PositionSwapJudge().judge(ra.Pair(prompt, response_a, response_b))
"""

from reflectagent.backends import Backend, BackendLM, backend, resolve_backend
from reflectagent.cache import JudgmentCache, current_cache, use_cache
from reflectagent.config import BackendConfig, ConfigError, Settings, load_settings
from reflectagent import pairs
from reflectagent.judge import Judge, PositionSwapJudge, judge_pairs
from reflectagent.modules import Analyzer, Reflector, VerdictStep
from reflectagent.pairs import BadLine, InvalidPair, Pair, read_pairs
from reflectagent.results import Analysis, Judgment, Reflection, Usage
from reflectagent.signatures import Analyze, Reflect, Verdict

__version__ = "0.1.0"

__all__ = [
    "Analysis", "Analyze", "Analyzer", "Backend", "BackendConfig", "BackendLM", "BadLine", "ConfigError",
    "InvalidPair", "Judge", "Judgment", "JudgmentCache", "Pair", "PositionSwapJudge", "Reflect", "Reflection",
    "Reflector", "Settings", "Usage", "Verdict", "VerdictStep", "backend", "current_cache", "load_settings",
    "judge_pairs", "pairs", "read_pairs", "resolve_backend", "use_cache",
]
