"""ReflectRM, full and adaptive, on the embedded model: what reflection decided and what it cost.

Run: .venv/bin/python examples/reflectrm.py
"""

import reflectagent as ra
from reflectagent.programs import AdaptiveReflectRM, ReflectRM

pairs = ra.pairs.sample_pairs(limit=6)
with ra.backend("embedded"):
    full = ra.judge_pairs(ReflectRM(), pairs, progress=False)
    adaptive = ra.judge_pairs(AdaptiveReflectRM(), pairs, progress=False)  # reuses full's samples from the cache

for pair, judgment in zip(pairs, full):
    print(f"{pair.id} (label {pair.label}): verdict {judgment.preference or judgment.reason}")
    for i, analysis in enumerate(judgment.analyses, 1):
        order = "B,A" if analysis.swapped else "A,B"
        print(f"   analysis {i} [{order}] -> {analysis.preference}: {analysis.text[:90]!r}")
    for r in judgment.reflections:
        picked = r.more_reliable + 1 if r.more_reliable is not None else "unparsed"
        print(f"   reflection ({r.first + 1} vs {r.second + 1}) -> analysis {picked}")

same = sum(a.preference == f.preference for a, f in zip(adaptive, full))
full_calls = sum(j.cost.lm_calls for j in full)
adaptive_calls = sum(j.cost.lm_calls for j in adaptive)
print(
    f"\nadaptive agrees with full on {same}/{len(pairs)} verdicts; "
    f"LM calls per verdict: full {full_calls / len(pairs):.1f}, adaptive {adaptive_calls / len(pairs):.1f}"
)
