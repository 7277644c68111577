"""Single-flight across processes: N processes on one cache folder make each distinct step once, and a
holder that dies frees its step for the others. Real processes, a real diskcache folder, and a fake
OpenAI-compatible engine on loopback that counts the calls it gets (control flow, not quality)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fakes import ThreadEngine as Engine

SCRIPT = """
import json, sys
import dspy
from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import GenRM
url, cache_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = Settings(backends={"fake": BackendConfig(model="openai/fake", api_base=url, api_key_env="FAKE_KEY",
                                                    constrained=False, logprobs=False, num_retries=0)})
pairs = [Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(n)]
with use_cache(JudgmentCache(cache_dir)), dspy.context(lm=resolve_backend("fake", settings)):
    judgments = judge_pairs(GenRM(both_orders=True), pairs, concurrency=4, progress=False)
print(json.dumps([j.preference for j in judgments]))
"""


def judge_in_process(engine: Engine, cache_dir, pairs: int, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, engine.api_base, str(cache_dir), str(pairs)],
        env={**os.environ, "FAKE_KEY": "not-a-secret", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_four_processes_on_one_cache_make_each_step_once(tmp_path):
    with Engine(delay_s=0.3) as engine:
        processes = [judge_in_process(engine, tmp_path / "cache", pairs=5) for _ in range(4)]
        outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    assert {out for out, _ in outputs} == {json.dumps(["A"] * 5) + "\n"}  # the same verdicts everywhere
    assert len(engine.calls) == 10 == len(set(engine.calls))  # 5 pairs x 2 orders, each made once


@pytest.mark.timeout(120)
def test_a_holder_that_dies_frees_its_step_for_the_others(tmp_path):
    env = {"REFLECTAGENT_LEASE_TTL_S": "1"}
    with Engine(delay_s=30) as engine:
        doomed = judge_in_process(engine, tmp_path / "cache", pairs=1, env=env)
        deadline = time.monotonic() + 60
        while len(engine.calls) < 2 and time.monotonic() < deadline:  # both orders are being made: leases held
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        engine.delay_s = 0.1
        started = time.monotonic()
        survivor = judge_in_process(engine, tmp_path / "cache", pairs=1, env=env)
        out, err = survivor.communicate(timeout=90)
    assert survivor.returncode == 0, err[-2000:]
    assert json.loads(out) == ["A"] and len(engine.calls) == 4  # the dead holder's two calls, made again once each
    assert time.monotonic() - started < 60  # it waited for the leases to lapse, not for the dead calls


def test_a_held_lease_is_not_counted_as_a_step(tmp_path):
    from reflectagent.cache import JudgmentCache

    cache = JudgmentCache(tmp_path / "cache")
    lease = cache.lease("k")
    assert lease.acquire() and len(cache) == 0 and not cache.lease("k").acquire()
    lease.release()
    assert cache.lease("k").acquire()
