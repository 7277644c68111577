"""Best-of-N and a full ranking of candidate answers with a pairwise judge.

Run: .venv/bin/python examples/ranking.py
"""

import reflectagent as ra
from reflectagent.programs import GenRM, best_of_n, rank

prompt = "What is the boiling point of water at sea level, in degrees Celsius?"
candidates = [
    "100 degrees Celsius.",
    "About 50 °C.",
    "Water boils at 100 °C at sea level (212 °F).",
    "It depends on the kettle.",
]
judge = GenRM(both_orders=True, decision="probability")  # order-averaged P(A): a calibrated score

with ra.backend("embedded"):
    ranking = rank(judge, prompt, candidates)
    best = best_of_n(judge, prompt, candidates)  # a tournament: N-1 comparisons

print(f"round robin: {len(ranking.comparisons)} comparisons, {ranking.usage.lm_calls} LM calls")
for place, index in enumerate(ranking.order, 1):
    print(
        f"  {place}. win rate {ranking.win_rate[index]:.2f}, Bradley-Terry {ranking.strength[index]:+.2f}: {candidates[index]}"
    )
print(f"tournament winner: {candidates[best]}")
