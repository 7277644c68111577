"""What the library itself costs per LM call, against lean clients sending the same requests.

    .venv/bin/python bench/library_overhead.py [--calls 2000] [--levels 16,64] [--rounds 4] [--paths vllm,vllm-counted,light]
        [--out bench/results/library_overhead.json]

The engine is ``bench/fake_engine.py`` in its own process (it answers at once, so the client is the
limit and its CPU is not counted). Two paths, each judged by ``GenRM()`` in one order with the cache off
(one LM call a judgment), at each concurrency level:

- ``vllm``, the path vLLM backends take by default: a ``hosted_vllm/`` backend, constrained output (a JSON
  schema in every request) and log-probs on (the engine sends each token's top 5, as vLLM does);
- ``vllm-counted``: the same against an engine that reports its context length (``--context``), as a real
  vLLM server does: every step then counts its prompt's tokens (``POST /tokenize``) to fit the context;
- ``light``: an ``openai/`` backend, no constraint, no log-probs (the path this bench measured first).

Clients, each sending the very requests the library sends (messages rendered beforehand, outside the
timing), ``asyncio.gather`` under a semaphore, and at least parsing the answer's JSON:

- ``library``: ``judge_pairs(GenRM(), ...)``; on ``vllm`` also ``library-dspy``, the same through DSPy's own
  transport (the path before ``reflectagent.vllm_client``), and on each ``library+cache`` (a cold diskcache
  folder) and ``warm`` (the same pairs again, every step from the cache);
- ``sdk``: ``openai.AsyncOpenAI`` (over httpx);
- ``httpx``: a lean ``httpx.AsyncClient`` POST, the reply read with ``response.json()``;
- ``aiohttp``: the same with a bare ``aiohttp.ClientSession`` and ``json``: the floor under the library's own
  client (``reflectagent.vllm_client`` is aiohttp), so the difference is what the library adds.

The calls of a level are split into ``--rounds`` rounds and the clients interleaved within each round
(their order rotating), so a machine whose load drifts during the run weighs on every client alike.
Reported: calls/s, client CPU ms per call (``time.process_time``, every thread of this process), and the
library's throughput ratios to ``httpx`` and ``sdk``. Ratios are what to read: absolute figures move with
the machine.
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

from reflectagent.backends import BackendLM, resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import GenRM
from reflectagent.signatures import Analyze
from reflectagent.steps import _request_settings

from fake_engine import spawn  # bench/, beside this script
from provenance import provenance


class ThroughDSPy(BackendLM):
    """The same backend with no client of its own: every step goes through DSPy's transport."""

    client = None


def backends(url: str, counted_url: str) -> dict[str, BackendConfig]:
    return {
        "vllm": BackendConfig(
            model="hosted_vllm/fake", api_base=url, num_retries=0
        ),  # constrained, log-probs: vLLM's defaults
        "vllm-counted": BackendConfig(model="hosted_vllm/fake", api_base=counted_url, num_retries=0),
        "light": BackendConfig(
            model="openai/fake", api_base=url, api_key_env="FAKE_KEY", constrained=False, logprobs=False, num_retries=0
        ),
    }


def request_bodies(lm: BackendLM, pairs: list[Pair]) -> list[dict]:
    """What the library sends for each pair: the rendered messages, the LM's options, the step's settings and the
    response format (a schema where the output is constrained)."""
    adapter = lm.backend.adapter()
    predict = dspy.Predict(Analyze)
    settings = {k: v for k, v in _request_settings(lm, predict, 0, None).items() if v is not None}
    extra = {"response_format": adapter.response_format(Analyze)} if adapter.constrained else {}
    return [
        {
            "model": lm.backend.served if lm.backend.config.is_vllm else "fake",
            "messages": adapter.format(Analyze, [], p.inputs()),
            **lm.request_options(),
            **settings,
            **extra,
        }
        for p in pairs
    ]


def sdk_client(url: str, bodies: list[dict], concurrency: int) -> None:
    import openai

    async def run():
        client = openai.AsyncOpenAI(
            base_url=url,
            api_key="k",
            max_retries=0,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)),
        )
        gate = asyncio.Semaphore(concurrency)

        async def one(body):
            async with gate:
                answer = await client.chat.completions.create(**body)
                json.loads(answer.choices[0].message.content)  # what the library does with it, at least

        await asyncio.gather(*(one(b) for b in bodies))
        await client.close()

    asyncio.run(run())


def httpx_client(url: str, bodies: list[dict], concurrency: int) -> None:
    async def run():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=url, limits=limits, timeout=60, headers={"Authorization": "Bearer k"}
        ) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(body):
                async with gate:
                    response = await client.post("/chat/completions", json=body)
                    response.raise_for_status()
                    json.loads(response.json()["choices"][0]["message"]["content"])

            await asyncio.gather(*(one(b) for b in bodies))

    asyncio.run(run())


def aiohttp_client(url: str, bodies: list[dict], concurrency: int) -> None:
    import aiohttp

    async def run():
        headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as session:
            gate = asyncio.Semaphore(concurrency)

            async def one(body):
                async with gate, session.post(f"{url}/chat/completions", data=json.dumps(body).encode()) as response:
                    response.raise_for_status()
                    reply = json.loads(await response.read())
                json.loads(reply["choices"][0]["message"]["content"])

            await asyncio.gather(*(one(b) for b in bodies))

    asyncio.run(run())


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(path: str, lm: BackendLM, url: str, level: int, calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Each client's wall and CPU seconds over ``calls`` calls, interleaved in ``rounds`` rounds."""
    tag = f"{path}-c{level}-{time.time_ns()}"  # fresh texts per level: nothing cached by anyone
    pairs = [
        Pair(prompt=f"[{tag}] question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(calls)
    ]
    bodies = request_bodies(lm, pairs)
    dspy_lm = ThroughDSPy(lm.backend) if path.startswith("vllm") else None
    off = JudgmentCache(enabled=False)

    def library(lm_, chunk):
        with dspy.context(lm=lm_), use_cache(off):
            judge_pairs(GenRM(), chunk, concurrency=level, progress=False)

    clients = {
        "library": lambda chunk, _: library(lm, chunk),
        **({"library-dspy": lambda chunk, _: library(dspy_lm, chunk)} if dspy_lm else {}),
        "sdk": lambda _, chunk: sdk_client(url, chunk, level),
        "httpx": lambda _, chunk: httpx_client(url, chunk, level),
        "aiohttp": lambda _, chunk: aiohttp_client(url, chunk, level),
    }
    warm = [Pair(prompt=f"[{tag}] warm-up {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(50)]
    for name, client in clients.items():  # imports, connections, DSPy's first-call costs
        client(
            [Pair(prompt=f"{p.prompt} {name}", response_a=p.response_a, response_b=p.response_b) for p in warm],
            request_bodies(lm, warm),
        )
    totals = {name: [0.0, 0.0] for name in clients}
    size = -(-calls // rounds)
    for r in range(rounds):
        chunk, body_chunk = pairs[r * size : (r + 1) * size], bodies[r * size : (r + 1) * size]
        names = list(clients)
        for name in names[r % len(names) :] + names[: r % len(names)]:  # the order rotates: no client always first
            wall, cpu = timed(lambda: clients[name](chunk, body_chunk))
            totals[name][0] += wall
            totals[name][1] += cpu
    with tempfile.TemporaryDirectory() as folder, use_cache(JudgmentCache(folder)), dspy.context(lm=lm):
        fresh = [Pair(prompt=f"{p.prompt} (cached)", response_a=p.response_a, response_b=p.response_b) for p in pairs]
        totals["library+cache"] = list(timed(lambda: judge_pairs(GenRM(), fresh, concurrency=level, progress=False)))
        totals["warm"] = list(timed(lambda: judge_pairs(GenRM(), fresh, concurrency=level, progress=False)))
    return {name: (wall, cpu) for name, (wall, cpu) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--paths", default="vllm,vllm-counted,light")
    parser.add_argument("--out", type=Path, default=Path("bench/results/library_overhead.json"))
    args = parser.parse_args()

    engine, base = spawn()
    counting, counting_base = spawn("--context", "32768")
    os.environ["FAKE_KEY"] = "k"
    settings = Settings(backends=backends(f"{base}/v1", f"{counting_base}/v1"))
    rows = []
    try:
        for path in args.paths.split(","):
            lm = resolve_backend(path, settings)
            url = lm.backend.api_base
            for level in [int(x) for x in args.levels.split(",")]:
                measured = measure(path, lm, url, level, args.calls, args.rounds)
                level_rows = [
                    {
                        "path": path,
                        "concurrency": level,
                        "client": name,
                        "calls_per_s": round(args.calls / wall, 1),
                        "cpu_ms_per_call": round(1000 * cpu / args.calls, 3),
                        "wall_s": round(wall, 3),
                    }
                    for name, (wall, cpu) in measured.items()
                ]
                for row in level_rows:  # throughput ratios: the reference's wall time over this client's
                    row["vs_httpx"] = round(measured["httpx"][0] / measured[row["client"]][0], 3)
                    row["vs_sdk"] = round(measured["sdk"][0] / measured[row["client"]][0], 3)
                rows += level_rows
                print(json.dumps(level_rows), flush=True)
    finally:
        engine.kill()
        counting.kill()
    args.out.write_text(
        json.dumps({**provenance(), "rounds": args.rounds, "calls": args.calls, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
