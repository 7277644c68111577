"""LM calls per GRPO group: judged together (``reflectagent.rl.groups``) against naive pairwise (every two of the N).

    .venv/bin/python bench/group_calls.py [--sizes 4,8,16,32,64] [--copies 2,4,8] [--out bench/results/group_calls.json]

Each group is a prompt and N responses, judged by a real program (``genrm-prob``: both orders, 2 calls a
judgment; ``genrm``: one order, 1 call) through the real step path and a fresh judgment cache, against the
fake engine (``bench/fake_engine.py``, an instant OpenAI-compatible server in its own process), whose own count
of chat requests is the figure: what an engine would have been asked. Naive pairwise is
``programs.ranking.arank`` round robin over the N as given, measured with no cache (a plain loop) and through a
fresh judgment cache (as the library always runs: identical steps are made once there too); grouped is
``Rewarder.arank`` through a fresh cache. Judgments count the comparisons that reached the judge (a pair of two
copies is refused before it). Three cases:

- **distinct**: N different responses (N = ``--sizes``): round robin up to 8 distinct, a tournament above;
- **copies**: 16 responses drawn from k distinct texts (k = ``--copies``), as a policy at low temperature gives;
- **again, reordered**: a group of 8 judged, then the same 8 in another order (the prompt's next visit): the
  calls of the second request alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
from pathlib import Path

import dspy
import httpx

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.programs import named_program
from reflectagent.programs.ranking import arank
from reflectagent.rl import Rewarder

from fake_engine import spawn  # bench/, beside this script
from provenance import provenance

PROMPT = "Write one sentence about the sea."


def responses(n: int, tag: str) -> list[str]:
    return [f"[{tag}] The sea, sentence {i}, is {'calm ' * (i % 5)}and wide." for i in range(n)]


class Counter:
    def __init__(self, url: str):
        self.url = url

    def __call__(self) -> int:
        return httpx.get(f"{self.url}/count", timeout=10).json()["chat"]


async def calls_of(count: Counter, work) -> int:
    before = count()
    await work()
    return count() - before


async def one_case(
    program: str, lm, group: list[str], count: Counter, work: Path, again: list[str] | None = None
) -> dict:
    """LM calls and judgments for ``group`` (and, with ``again``, for that reordered group after it): naive with no
    cache, naive through a fresh cache, grouped through a fresh cache."""
    judge = named_program(program)
    rewarder = Rewarder(judge, lm=lm)
    out, judged = {}, {}

    async def rank(name: str, g: list[str]) -> None:
        ranking = await (rewarder.arank(PROMPT, g) if name == "grouped" else arank(judge, PROMPT, g))
        judged[name] = sum(bool(c.judgment.steps) for c in ranking.comparisons)  # not refused as two copies

    for name, enabled in (("naive_no_cache", False), ("naive", True), ("grouped", True)):
        with (
            use_cache(JudgmentCache(Path(tempfile.mkdtemp(dir=work)), enabled=enabled)),
            dspy.context(lm=lm, trace=None),
        ):
            first = await calls_of(count, lambda: rank(name, group))
            out[f"calls_{name}"] = first if again is None else await calls_of(count, lambda: rank(name, again))
            out[f"judgments_{name}"] = judged[name]
    del out["judgments_naive_no_cache"]
    return out


async def run(args, url: str, work: Path) -> list[dict]:
    os.environ.setdefault("FAKE_ENGINE_KEY", "not-a-secret")
    settings = Settings(
        backends={
            "engine": BackendConfig(
                model="openai/fake",
                api_base=f"{url}/v1",
                api_key_env="FAKE_ENGINE_KEY",
                constrained=False,
                logprobs=True,
                num_retries=0,
            )
        }
    )
    lm, count, rows = resolve_backend("engine", settings), Counter(url), []
    for program in ("genrm-prob", "genrm"):
        draw = random.Random(0)  # the same groups for both programs
        for n in args.sizes:
            group = responses(n, f"{program} distinct {n}")
            rows.append(
                {
                    "program": program,
                    "case": "distinct",
                    "n": n,
                    "distinct": n,
                    **await one_case(program, lm, group, count, work),
                }
            )
        for k in args.copies:
            texts = responses(k, f"{program} copies {k}")  # tagged: no two cases share a text
            group = texts + [draw.choice(texts) for _ in range(16 - k)]
            draw.shuffle(group)
            rows.append(
                {
                    "program": program,
                    "case": "copies",
                    "n": 16,
                    "distinct": k,
                    **await one_case(program, lm, group, count, work),
                }
            )
        group = responses(8, f"{program} again")
        reordered = group[:]
        draw.shuffle(reordered)
        rows.append(
            {
                "program": program,
                "case": "again, reordered",
                "n": 8,
                "distinct": 8,
                **await one_case(program, lm, group, count, work, again=reordered),
            }
        )
        for row in rows[-(len(args.sizes) + len(args.copies) + 1) :]:
            row["calls_grouped_per_naive"] = (
                round(row["calls_grouped"] / row["calls_naive"], 3) if row["calls_naive"] else None
            )
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,16,32,64")
    parser.add_argument("--copies", default="2,4,8")
    parser.add_argument("--out", type=Path, default=Path("bench/results/group_calls.json"))
    args = parser.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.copies = [int(x) for x in args.copies.split(",")]
    engine, url = spawn()
    try:
        with tempfile.TemporaryDirectory() as work:
            rows = asyncio.run(run(args, url, Path(work)))
    finally:
        engine.terminate()
        engine.wait(30)
    args.out.write_text(json.dumps({**provenance(), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
