"""A warm re-run makes no LM call, starts no server and is fast: ``reflectagent eval`` cold, then the same command again.

    .venv/bin/python bench/warm_rerun.py [--pairs 150] [--program genrm-both] [--out bench/results/warm_rerun.json]

Cold: a fresh cache folder, the embedded backend (SmolLM2, its vLLM server started by the command),
``--pairs`` labelled test pairs from ../shared/data (each judged as given and swapped). Warm: the same
command, with no server running. Timed command to command (process start to exit), as a user sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance  # bench/, beside this script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--program", default="genrm-both")
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_rerun.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = work / "pairs.jsonl"
        lines = (SHARED / "pandalm.jsonl").read_text(encoding="utf-8").splitlines()
        data.write_text("\n".join(lines[: args.pairs]) + "\n", encoding="utf-8")
        env = {**os.environ, "REFLECTAGENT_EMBEDDED_URL": ""}
        for phase in ("cold", "warm"):
            out = work / phase
            command = [
                sys.executable,
                "-m",
                "reflectagent.cli",
                "-v",
                "eval",
                "--data",
                str(data),
                "--programs",
                args.program,
                "--backends",
                "embedded",
                "--cache-dir",
                str(work / "cache"),
                "-o",
                str(out),
            ]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            [run] = json.loads((out / "run.json").read_text())
            rows.append(
                {
                    "phase": phase,
                    "wall_s": round(wall, 2),
                    "lm_calls": run["lm_calls_made"],
                    "judgments": run["judgments"],
                    "server_started": "starting vLLM" in done.stderr,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        **provenance(),
        "pairs": args.pairs,
        "program": args.program,
        "rows": rows,
        "cold_over_warm": round(rows[0]["wall_s"] / rows[1]["wall_s"], 1),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
