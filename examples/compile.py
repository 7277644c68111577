"""Compile GenRM with BootstrapFewShot (STaR-filtered demos), compare train/dev, save and reload.

Run: .venv/bin/python examples/compile.py
"""

import reflectagent as ra
from reflectagent.programs import GenRM, load_program
from reflectagent.programs.compile import compile_judge, evaluate_judge

pairs = ra.pairs.sample_pairs()
train, dev = pairs[:16], pairs[16:]
with ra.backend("embedded"):
    program = GenRM()
    before = evaluate_judge(program, dev)
    compiled = compile_judge(program, train, "bootstrap", max_demos=2)
    after = evaluate_judge(compiled, dev)
    path = compiled.save("genrm-compiled.json")
    reloaded = evaluate_judge(load_program(path), dev)

print(f"demos bootstrapped: {len(compiled.analyzer.predict.demos)}")
print(f"dev accuracy ({len(dev)} pairs): before {before:.2f}, after {after:.2f}, reloaded {reloaded:.2f}")
print(f"saved to {path}")
