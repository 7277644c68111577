"""What the library itself costs per LM call, against a raw async OpenAI client on the same requests.

    .venv/bin/python bench/library_overhead.py [--calls 2000] [--levels 16,64] [--out bench/results/library_overhead.json]

The engine is ``bench/fake_engine.py`` in its own process (it answers at once, so the client is the
limit and its CPU is not counted). At each concurrency level, in one run:

- ``raw``: ``openai.AsyncOpenAI`` sends each request GenRM would send (messages rendered beforehand,
  outside the timing), ``asyncio.gather`` under a semaphore;
- ``library``: ``judge_pairs(GenRM(), ...)`` with the cache off (one LM call a judgment);
- ``library+cache``: the same through a cold diskcache folder, then ``warm``: the same pairs again.

Reported: calls/s, client CPU ms per call (``time.process_time``, every thread of this process), and
the library's ratios to ``raw``. Ratios are what to read: absolute figures move with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import dspy
import httpx

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import GenRM
from reflectagent.signatures import Analyze

from fake_engine import spawn  # bench/, beside this script
from provenance import provenance


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def raw_client(url: str, requests: list[list[dict]], concurrency: int) -> None:
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)))
        gate = asyncio.Semaphore(concurrency)

        async def one(messages):
            async with gate:
                answer = await client.chat.completions.create(model="fake", messages=messages, temperature=0.0, max_tokens=512)
                json.loads(answer.choices[0].message.content)  # what the library does with it, at least

        await asyncio.gather(*(one(m) for m in requests))
        await client.close()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--out", type=Path, default=Path("bench/results/library_overhead.json"))
    args = parser.parse_args()

    engine, base = spawn()
    url = f"{base}/v1"
    os.environ["FAKE_KEY"] = "k"
    settings = Settings(backends={"fake": BackendConfig(model="openai/fake", api_base=url, api_key_env="FAKE_KEY",
                                                        constrained=False, logprobs=False, num_retries=0)})
    lm = resolve_backend("fake", settings)
    adapter = lm.backend.adapter()
    rows = []
    try:
        for level in [int(x) for x in args.levels.split(",")]:
            tag = f"c{level}-{time.time_ns()}"  # fresh texts per level: nothing cached by anyone
            pairs = [Pair(prompt=f"[{tag}] question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(args.calls)]
            requests = [adapter.format(Analyze, [], p.inputs()) for p in pairs]
            with dspy.context(lm=lm):
                judge_pairs(GenRM(), pairs[:50], concurrency=level, progress=False)  # warm-up: imports, connections
                raw_client(url, requests[:50], level)
                measured = {"raw": timed(lambda: raw_client(url, requests, level))}
                with use_cache(JudgmentCache(enabled=False)):
                    measured["library"] = timed(lambda: judge_pairs(GenRM(), pairs, concurrency=level, progress=False))
                with tempfile.TemporaryDirectory() as folder, use_cache(JudgmentCache(folder)):
                    fresh = [Pair(prompt=f"{p.prompt} (cached)", response_a=p.response_a, response_b=p.response_b) for p in pairs]
                    measured["library+cache"] = timed(lambda: judge_pairs(GenRM(), fresh, concurrency=level, progress=False))
                    measured["warm"] = timed(lambda: judge_pairs(GenRM(), fresh, concurrency=level, progress=False))
            for name, (wall, cpu) in measured.items():
                rows.append({"concurrency": level, "path": name, "calls_per_s": round(args.calls / wall, 1),
                             "cpu_ms_per_call": round(1000 * cpu / args.calls, 3), "wall_s": round(wall, 3)})
            raw = measured["raw"][0]
            for row in rows[-4:]:
                row["throughput_vs_raw"] = round(raw / (args.calls / row["calls_per_s"]), 3)
            print(json.dumps(rows[-4:]), flush=True)
    finally:
        engine.kill()
    args.out.write_text(json.dumps({**provenance(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
