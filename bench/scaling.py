"""Does the cost per judgment stay flat as a run grows? 100, 1k and 10k pairs through the instant fake engine.

    .venv/bin/python bench/scaling.py [--sizes 100,1000,10000] [--concurrency 16] [--out bench/results/scaling.json]

Each size runs in a fresh process (so its peak memory is its own): ``reflectagent judge`` on a JSONL
file of that many pairs, GenRM (one LM call a judgment), a fresh diskcache folder, output written to
a file. Reported: wall seconds, ms per judgment beyond the command's start-up (measured on one pair),
client CPU ms per judgment and peak RSS, cold and then warm (the same command again: every step from
the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fake_engine import spawn  # bench/, beside this script
from provenance import provenance


def run(command: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
    }  # the largest child so far: sizes go up, so it is this one's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    args = parser.parse_args()
    engine, url = spawn()
    env = {**os.environ, "FAKE_KEY": "k", "REFLECTAGENT_EMBEDDED_URL": ""}
    rows = []
    try:
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            config = work / "c.toml"
            config.write_text(
                f'[backends.fake]\nmodel = "openai/fake"\napi_base = "{url}/v1"\n'
                'api_key_env = "FAKE_KEY"\nconstrained = false\nlogprobs = false\nnum_retries = 0\n'
            )
            startup = {}
            for size in [1, *[int(s) for s in args.sizes.split(",")]]:
                data = work / f"pairs-{size}.jsonl"
                data.write_text(
                    "".join(
                        json.dumps(
                            {
                                "id": str(i),
                                "prompt": f"[{size}] question {i}: " + "context " * 40,
                                "response_a": f"right {i} " * 20,
                                "response_b": f"wrong {i} " * 20,
                                "label": "A",
                            }
                        )
                        + "\n"
                        for i in range(size)
                    )
                )
                command = [
                    sys.executable,
                    "-m",
                    "reflectagent.cli",
                    "judge",
                    str(data),
                    "--program",
                    "genrm",
                    "--backend",
                    "fake",
                    "--config",
                    str(config),
                    "--cache-dir",
                    str(work / f"cache-{size}"),
                    "--concurrency",
                    str(args.concurrency),
                    "--quiet",
                    "--output",
                    str(work / f"out-{size}.jsonl"),
                ]
                for phase in ("cold", "warm"):
                    measured = run(command, env)
                    if size == 1:
                        startup[phase] = measured
                        continue
                    rows.append(
                        {
                            "pairs": size,
                            "phase": phase,
                            **measured,
                            "startup_wall_s": startup[phase]["wall_s"],
                            "ms_per_judgment": round(1000 * (measured["wall_s"] - startup[phase]["wall_s"]) / size, 3),
                            "cpu_ms_per_judgment": round(
                                1000 * (measured["cpu_s"] - startup[phase]["cpu_s"]) / size, 3
                            ),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.kill()
    args.out.write_text(json.dumps({**provenance(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
