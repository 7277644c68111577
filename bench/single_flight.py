"""Do processes that share a cache make each step once? N ``reflectagent judge`` processes on the same pairs.

    .venv/bin/python bench/single_flight.py [--pairs 100] [--out bench/results/single_flight.json]

Four processes on one diskcache folder, then two on one Redis (Debian's ``redis-server``, started here
on loopback with no persistence), all started together on the same file of pairs (GenRM both orders:
two distinct steps a pair). The engine is ``bench/fake_engine.py`` with a small delay, so the
processes really overlap. Reported: LM calls the engine got, distinct steps, and their ratio (1.0 is
every step made once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from reflectagent.server import free_port

from fake_engine import spawn  # bench/, beside this script
from provenance import provenance


def together(processes: int, command: list[str], env: dict) -> float:
    started = time.perf_counter()
    running = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for process in running:
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(err[-2000:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("bench/results/single_flight.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = work / "pairs.jsonl"
        data.write_text(
            "".join(
                json.dumps(
                    {"id": str(i), "prompt": f"question {i}", "response_a": f"right {i}", "response_b": f"wrong {i}"}
                )
                + "\n"
                for i in range(args.pairs)
            )
        )
        redis_port = free_port()
        redis = subprocess.Popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            for store, processes in (("diskcache", 4), ("redis", 2)):
                engine, url = spawn("--delay", str(args.delay))
                try:
                    config = work / f"{store}.toml"
                    cache = f'cache_url = "redis://127.0.0.1:{redis_port}/0"\n' if store == "redis" else ""
                    config.write_text(
                        cache + f'[backends.fake]\nmodel = "openai/fake"\napi_base = "{url}/v1"\n'
                        'api_key_env = "FAKE_KEY"\nconstrained = false\nlogprobs = false\nnum_retries = 0\n'
                    )
                    command = [
                        sys.executable,
                        "-m",
                        "reflectagent.cli",
                        "judge",
                        str(data),
                        "--program",
                        "genrm-both",
                        "--backend",
                        "fake",
                        "--config",
                        str(config),
                        "--quiet",
                        "--concurrency",
                        "8",
                    ]
                    if store == "diskcache":
                        command += ["--cache-dir", str(work / "cache")]
                    wall = together(processes, command, {**os.environ, "FAKE_KEY": "k"})
                    calls = httpx.get(f"{url}/count").json()["chat"]
                finally:
                    engine.kill()
                distinct = 2 * args.pairs
                rows.append(
                    {
                        "store": store,
                        "processes": processes,
                        "lm_calls": calls,
                        "distinct_steps": distinct,
                        "calls_per_distinct_step": round(calls / distinct, 3),
                        "wall_s": round(wall, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            redis.kill()
    args.out.write_text(json.dumps({**provenance(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
