"""Load on ``reflectagent serve-rm`` over loopback: requests/s held, p50/p99 latency, and nothing lost.

    .venv/bin/python bench/reward_service_load.py [--engine fake|embedded|both] [--levels 1,16,64] [--seconds 60]

After one unmeasured warm-up request (the embedded server starts at the first step), each level
sends distinct ``POST /v1/judge`` requests (GenRM in both orders, so two LM calls each, none
from the cache) from that many concurrent clients, for at most ``--requests`` requests or ``--seconds``.
Two engines behind the service: an instant fake OpenAI-compatible server (the service's own ceiling)
and the embedded vLLM server (the engine-bound case). The service, the fake engine and this client are
separate processes, as in use. A request that is neither answered 200 nor refused 503 (capacity) is
counted lost; an answered one whose judgment reached no verdict is counted in ``abstained`` (an answer, not a
failure: the service says so instead of guessing). Results: ``bench/results/reward_service_load.json``, with
the command and the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from reflectagent.server import free_port

from fake_engine import spawn  # bench/, beside this script
from provenance import provenance


def wait_for(url: str, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


async def level(url: str, clients: int, requests: int, seconds: float, tag: str) -> dict:
    latencies, statuses, errors, abstained = [], {}, 0, 0
    issued = 0
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient):
        nonlocal issued, errors, abstained
        while issued < requests and time.monotonic() < stop:
            issued += 1
            n = issued
            body = {
                "prompt": f"[{tag} {clients} {n}] What is the capital of France?",
                "response_a": f"Paris ({n}).",
                "response_b": f"Berlin ({n}).",
            }
            started = time.perf_counter()
            try:
                answer = await http.post(f"{url}/v1/judge", json=body)
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    abstained += answer.json()["preference"] is None
            except httpx.HTTPError:
                errors += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    answered = statuses.get(200, 0)
    quantiles = (
        statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [latencies[0]] * 99 if latencies else None
    )
    return {
        "clients": clients,
        "sent": issued,
        "answered": answered,
        "abstained": abstained,
        "refused_503": statuses.get(503, 0),
        "lost": issued - answered - statuses.get(503, 0),
        "other_statuses": {k: v for k, v in statuses.items() if k not in (200, 503)},
        "transport_errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(answered / wall, 2),
        "p50_s": round(quantiles[49], 4) if quantiles else None,
        "p99_s": round(quantiles[98], 4) if quantiles else None,
    }


def run_engine(engine: str, levels: list[int], requests: int, seconds: float, work: Path) -> list[dict]:
    processes = []
    env = {**os.environ, "FAKE_ENGINE_KEY": "not-a-secret", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    config = work / f"{engine}.toml"
    if engine == "fake":
        engine, engine_url = spawn()
        processes.append(engine)
        config.write_text(
            f'[backends.engine]\nmodel = "openai/fake"\napi_base = "{engine_url}/v1"\n'
            'api_key_env = "FAKE_ENGINE_KEY"\nconstrained = false\nlogprobs = false\nnum_retries = 0\n'
        )
    else:
        config.write_text('[backends.engine]\nmodel = "embedded"\ncontext_chars = 4000\n')
    service_port = free_port()
    processes.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reflectagent.cli",
                "serve-rm",
                "--program",
                "genrm-both",
                "--backend",
                "engine",
                "--port",
                str(service_port),
                "--config",
                str(config),
                "--cache-dir",
                str(work / f"cache-{engine}"),
                "--max-concurrency",
                "64",
                "--max-queue",
                "256",
            ],
            env=env,
        )
    )
    url = f"http://127.0.0.1:{service_port}"
    try:
        wait_for(f"{url}/health")
        warm = httpx.post(
            f"{url}/v1/judge", timeout=900, json={"prompt": "warm-up", "response_a": "a", "response_b": "b"}
        )
        warm.raise_for_status()  # the engine is up (the embedded server starts at the first step): not measured
        results = []
        for clients in levels:
            result = asyncio.run(
                level(url, clients, requests if engine == "fake" else max(clients, 8), seconds, engine)
            )
            results.append({"engine": engine, **result})
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("fake", "embedded", "both"), default="both")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--requests", type=int, default=600, help="at most this many requests per level (fake engine)")
    parser.add_argument("--seconds", type=float, default=60, help="at most this long per level")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reward_service_load.json"))
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    engines = ("fake", "embedded") if args.engine == "both" else (args.engine,)
    with tempfile.TemporaryDirectory() as work:
        results = [r for engine in engines for r in run_engine(engine, levels, args.requests, args.seconds, Path(work))]
    args.out.write_text(json.dumps({**provenance(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
