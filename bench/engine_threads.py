"""How many cores should vLLM's CPU engine compute on? One run, the settings side by side, on the demo's judge.

    .venv/bin/python bench/engine_threads.py [--preset qwen2.5-coder-1.5b-verdict] [--dtype bfloat16] [--limit 32]
        [--settings reserve1,reserve0] [--programs direct-prob,genrm-prob] [--out bench/results/engine_threads.json]

vLLM's CPU backend keeps ``VLLM_CPU_NUM_OF_RESERVED_CPU`` cores (default: one per worker) out of its
OpenMP compute threads, for the API server and the engine core. On a machine with two cores that is
half the compute. Each setting here starts its own server on the same model, then measures, in order:

- start-up: seconds until ``/v1/models`` answers;
- the worker's CPU affinity (``/proc/<pid>/status`` of every process under the server);
- prefill: a ~1,500-token prompt, distinct per request so the prefix cache cannot answer, one output
  token, three times in a row: prompt tokens per second;
- judgments per minute for ``direct-prob`` and for ``genrm-prob`` (the demo's program) on the first
  ``--limit`` pairs shipped with reflectagent, both orders each, each setting in a fresh judgment cache
  (so every call is made), concurrency 8 as ``reflectagent judge`` does;
- the client's own CPU seconds per LM call over those runs (``time.process_time``);
- the verdicts, so agreement between settings can be read (they should be the same model's).

Settings: ``reserve1`` keeps vLLM's default core reservation, ``reserve0`` gives the worker every core, ``reserveauto``
is whatever :func:`reflectagent.server.server_env` picks for this machine; ``NAME@16`` judges 16 pairs at a
time instead of 8 (more sequences decoding at once); ``NAME+bN`` serves with ``--block-size N``. Without it the
server gets reflectagent's own CPU default, ``reflectagent.server.CPU_BLOCK_SIZE`` (32 since the run in
``results/engine_threads-genrm-b32.json``), so vLLM's defaults in full are ``reserve1+b128``. vLLM's CPU default
is 128: its prefix cache reuses whole blocks only, so a prompt's shared system message, 329 tokens for the demo's
judge, is reused to 256 tokens with 128, to 320 with 32. Each
program's prefix-cache hit rate is read from the server's ``/metrics``. Ratios between settings are
what to read: the machine is shared and noisy, and this script must run with nothing else on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dspy
import httpx

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.embedded import EMBEDDED_URL_ENV, SERVED_NAME
from reflectagent.judge import judge_pairs
from reflectagent.models import prepare_model
from reflectagent.pairs import sample_pairs
from reflectagent.programs import named_program
from reflectagent.server import RESERVED_CPU_ENV, ServerSpec, VLLMServer

from provenance import provenance  # bench/, beside this script

SETTINGS = {"reserve1": "1", "reserve0": "0", "reserveauto": None}
PROGRAMS = ("direct-prob", "genrm-prob")


def affinities(root_pid: int) -> dict[str, str]:
    """Every process under ``root_pid`` (itself included): its name and the CPUs it may run on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = dict(
                line.split(":\t", 1)
                for line in (Path("/proc") / str(pid) / "status").read_text().splitlines()
                if ":\t" in line
            )
        except OSError:
            continue
        found[f"{status['Name'].strip()} ({pid})"] = status["Cpus_allowed_list"].strip()
    return found


def prefill_tokens_per_s(url: str, tries: int = 3) -> list[float]:
    """Prompt tokens per second of a long prompt that no earlier request shares a prefix with."""
    text = " ".join(f"item {i}: the quick brown fox jumps over the lazy dog." for i in range(130))
    rates = []
    with httpx.Client(timeout=600) as client:
        for _ in range(tries):
            started = time.perf_counter()
            answer = client.post(
                f"{url}/completions",
                json={"model": SERVED_NAME, "prompt": f"{uuid.uuid4()} {text}", "max_tokens": 1, "temperature": 0},
            )
            answer.raise_for_status()
            rates.append(answer.json()["usage"]["prompt_tokens"] / (time.perf_counter() - started))
    return rates


def prefix_cache_counts(url: str) -> tuple[float, float]:
    """(tokens looked up, tokens found) in the server's prefix cache so far, from its Prometheus metrics."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    counts = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        for kind in counts:
            if line.startswith(f"vllm:prefix_cache_{kind}_total"):
                counts[kind] += float(line.rsplit(" ", 1)[1])
    return counts["queries"], counts["hits"]


def parse_setting(setting: str) -> tuple[str | None, int, list[str]]:
    """``reserve0+b32@16`` -> (reserved cores env, pairs at a time, extra server arguments)."""
    head, _, at = setting.partition("@")
    name, *mods = head.split("+")
    extra = []
    for mod in mods:
        if not (mod.startswith("b") and mod[1:].isdigit() and int(mod[1:]) > 0):
            raise ValueError(f"unknown modifier {mod!r} in {setting!r}: only bN (--block-size N), before any @N")
        extra += ["--block-size", mod[1:]]
    if name not in SETTINGS or not (at or "8").isdigit():
        raise ValueError(f"unknown setting {setting!r}: NAME[+bN][@N], NAME one of {', '.join(SETTINGS)}")
    return SETTINGS[name], int(at or 8), extra  # default 8 pairs at a time, the CLI's


def measure(setting: str, model_dir: Path, args: argparse.Namespace, pairs) -> dict:
    reserved, concurrency, extra_args = parse_setting(setting)
    if reserved is None:
        os.environ.pop(RESERVED_CPU_ENV, None)
    else:
        os.environ[RESERVED_CPU_ENV] = reserved
    spec = ServerSpec(
        model_dir=str(model_dir), served_name=SERVED_NAME, max_model_len=4096, dtype=args.dtype, extra_args=extra_args
    )
    server = VLLMServer(spec)
    started = time.perf_counter()
    server.start()
    result = {"setting": setting, "reserved_cpus_env": reserved, "startup_s": round(time.perf_counter() - started, 1)}
    try:
        result["affinity"] = affinities(server.process.pid)
        result["prefill_tokens_per_s"] = [round(r) for r in prefill_tokens_per_s(server.url)]
        os.environ[EMBEDDED_URL_ENV] = server.url
        settings = Settings(
            backends={
                "local": BackendConfig(model="embedded", model_path=args.preset, dtype=args.dtype, timeout_s=1800)
            }
        )
        for name in args.programs:
            lm = resolve_backend("local", settings)
            before = prefix_cache_counts(server.url)
            with tempfile.TemporaryDirectory() as cache_dir, use_cache(JudgmentCache(cache_dir)), dspy.context(lm=lm):
                cpu, wall = time.process_time(), time.perf_counter()
                judgments = judge_pairs(
                    named_program(name), pairs, concurrency=concurrency, progress=sys.stderr.isatty()
                )
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            queried, hit = (after - first for after, first in zip(prefix_cache_counts(server.url), before))
            calls = sum(j.lm_calls for j in judgments)
            right = sum(j.preference == p.label for j, p in zip(judgments, pairs))
            result[name] = {
                "pairs": len(pairs),
                "wall_s": round(wall, 1),
                "judgments_per_min": round(60 * len(pairs) / wall, 2),
                "lm_calls": calls,
                "client_cpu_ms_per_call": round(1000 * cpu / max(calls, 1), 2),
                "right": right,
                "prefix_cache_queried_tokens": int(queried),  # the prompt tokens looked up (preempted ones apart)
                "prefix_cache_hit_rate": round(hit / queried, 3) if queried else None,
                "verdicts": [j.preference for j in judgments],
            }
            logging.info(
                "%s %s: %.2f judgments/min, %d of %d right", setting, name, 60 * len(pairs) / wall, right, len(pairs)
            )
    finally:
        os.environ.pop(EMBEDDED_URL_ENV, None)
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-coder-1.5b-verdict", help="the demo's judge")
    parser.add_argument("--dtype", default="bfloat16", help="the demo's dtype")
    parser.add_argument("--limit", type=int, default=32, help="the first N shipped pairs (the demo judges 32)")
    parser.add_argument("--settings", default="reserve1,reserve0", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated named programs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_threads.json"))
    args = parser.parse_args()
    args.programs = args.programs.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    chosen = args.settings.split(",")
    for setting in chosen:  # all of them before the first is measured
        try:
            parse_setting(setting)
        except ValueError as exc:
            parser.error(str(exc))
    model_dir = prepare_model(args.preset)
    pairs = sample_pairs(args.limit)
    results = [measure(setting, model_dir, args, pairs) for setting in chosen]
    first = results[0]
    for result in results[1:]:
        result["ratio_to_" + first["setting"]] = {
            "prefill": round(max(result["prefill_tokens_per_s"]) / max(first["prefill_tokens_per_s"]), 2),
            **{
                name: round(result[name]["judgments_per_min"] / first[name]["judgments_per_min"], 2)
                for name in args.programs
            },
            "verdict_agreement": {
                name: sum(a == b for a, b in zip(result[name]["verdicts"], first[name]["verdicts"])) / len(pairs)
                for name in args.programs
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({**provenance(), "preset": args.preset, "dtype": args.dtype, "results": results}, indent=1)
    )
    print(json.dumps([{k: v for k, v in r.items() if k not in args.programs} for r in results], indent=1))


if __name__ == "__main__":
    main()
