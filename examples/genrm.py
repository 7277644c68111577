"""GenRM on the embedded model: one order, both orders, and the verdict-probability rule.

Run: .venv/bin/python examples/genrm.py
"""

import reflectagent as ra
from reflectagent.programs import GenRM

pairs = ra.pairs.sample_pairs(limit=6)
programs = {
    "GenRM, one order": GenRM(),
    "GenRM, both orders (vote)": GenRM(both_orders=True),
    "GenRM, both orders (P(A) > 0.5)": GenRM(both_orders=True, decision="probability"),
}
with ra.backend("embedded"):
    for name, program in programs.items():
        judgments = ra.judge_pairs(program, pairs, progress=False)
        correct = sum(j.preference == p.label for p, j in zip(pairs, judgments))
        calls = sum(j.cost.lm_calls for j in judgments)
        print(
            f"{name:34s} verdicts {sum(j.parsed for j in judgments)}/{len(pairs)}, correct {correct}, "
            f"LM calls {calls} ({calls / len(pairs):.1f} per pair)"
        )
        first = judgments[0]
        print(
            f"    e.g. {pairs[0].id}: {first.preference or first.reason}; P(A)={first.probability_a}; "
            f"analysis: {first.analyses[0].text[:100]!r}"
        )
