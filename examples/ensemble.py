"""A vote across backends and a cascade that escalates when the cheap judge is unsure.

The second backend here is the embedded model again with different sampling; in practice it
would be a stronger model: add it to reflectagent.toml and put its name below.

Run: .venv/bin/python examples/ensemble.py
"""

import reflectagent as ra
from reflectagent.programs import Cascade, Ensemble, GenRM, ReflectRM

settings = ra.Settings(
    backends={
        "warm": ra.BackendConfig(model="embedded", temperature=0.8, seed=1, context_chars=4000),
    }
)
pair = ra.pairs.sample_pairs(limit=1)[0]
with ra.backend("embedded", settings):
    ensemble = Ensemble(
        [
            (GenRM(), "embedded"),
            (GenRM(), ra.resolve_backend("warm", settings)),
            (GenRM(both_orders=True, decision="probability"), None),
        ]
    )
    cascade = Cascade([(ra.PositionSwapJudge(), None), (ReflectRM(), None)])
    voted, escalated = ensemble.judge(pair), cascade.judge(pair)

print(f"pair {pair.id}, label {pair.label}")
print(f"ensemble: {voted.preference or voted.reason} from member votes {[p.preference for p in voted.parts]}")
print(
    f"cascade: {escalated.preference or escalated.reason}; members asked: {len(escalated.parts)}; "
    f"LM calls {escalated.cost.lm_calls}; notes {escalated.notes}"
)
