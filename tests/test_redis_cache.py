"""The judgment cache in Redis (a real redis-server on loopback): the same keys and single-flight as the
diskcache folder, shared by processes as machines would share it, and nothing lost when one dies."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fakes import ThreadEngine as Engine
from fakes import fake_api_backend
from test_single_flight import SCRIPT

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None,
    reason="redis-server is not installed (scripts/test.sh installs Debian's `redis-server` where apt-get can)",
)


@pytest.fixture
def redis_url(tmp_path):
    from reflectagent.server import free_port

    port = free_port()
    process = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


RANGE_SCRIPT = SCRIPT.replace(
    'pairs = [Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(n)]',
    'start = int(sys.argv[4]); pairs = [Pair(prompt=f"question {i}", response_a=f"right {i}", '
    'response_b=f"wrong {i}") for i in range(start, start + n)]',
)
RANGE_SCRIPT = RANGE_SCRIPT.replace("JudgmentCache(cache_dir)", "JudgmentCache(url=cache_dir)")


def judge_range(engine, url, start, n, env=None):
    import os

    return subprocess.Popen(
        [sys.executable, "-c", RANGE_SCRIPT, engine.api_base, url, str(n), str(start)],
        env={**os.environ, "FAKE_KEY": "k", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_share_overlapping_work_through_redis_once(redis_url):
    with Engine(delay_s=0.2) as engine:
        first, second = judge_range(engine, redis_url, 0, 6), judge_range(engine, redis_url, 3, 6)
        outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], [err[-1500:] for _, err in outputs]
    assert all(json.loads(out) == ["A"] * 6 for out, _ in outputs)
    assert len(engine.calls) == 18 == len(set(engine.calls))  # pairs 0..8, both orders, each made once
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    rows = [json.loads(client.get(key)) for key in client.scan_iter("reflectagent:*")]
    assert len(rows) == 18 and all(row["fields"]["preference"] in ("A", "B") for row in rows)  # JSON, never pickle


def test_a_process_killed_midway_loses_nothing(redis_url):
    import redis

    env = {"REFLECTAGENT_LEASE_TTL_S": "1"}
    client = redis.Redis.from_url(redis_url)
    with Engine(delay_s=0.5) as engine:
        doomed = judge_range(engine, redis_url, 0, 6, env)
        deadline = time.monotonic() + 120
        while sum(1 for _ in client.scan_iter("reflectagent:[0-9a-f]*")) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        finished = sum(1 for _ in client.scan_iter("reflectagent:[0-9a-f]*"))
        calls_before = len(engine.calls)
        survivor = judge_range(engine, redis_url, 0, 6, env)
        out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-1500:]
    assert json.loads(out) == ["A"] * 6 and 4 <= finished < 12
    assert len(engine.calls) - calls_before == 12 - finished  # every finished step reused; only the rest made


def test_the_cli_uses_a_redis_cache_from_the_config(redis_url, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'cache_url = "{redis_url}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "reflectagent.cli", "cache", "info", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert redis_url.removeprefix("redis://") in done.stdout and "entries" in done.stdout


def test_a_library_backend_block_judges_into_the_configured_redis(redis_url, tmp_path, monkeypatch):
    """No ``use_cache``: the ``backend()`` block's settings name the Redis, as the loop's teacher settings do."""
    import redis

    from fakes import PAIR
    from reflectagent import cache as cache_module
    from reflectagent.backends import backend
    from reflectagent.config import Settings
    from reflectagent.judge import judge_pairs
    from reflectagent.programs import named_program

    monkeypatch.setattr(cache_module, "_defaults", {})
    monkeypatch.setenv("REFLECTAGENT_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("FAKE_KEY", "k")
    monkeypatch.delenv("REFLECTAGENT_CACHE", raising=False)
    with Engine(delay_s=0) as engine:
        settings = Settings(
            backends={"api": fake_api_backend(engine.api_base)},
            cache_url=redis_url,
        )
        with backend("api", settings):
            judge_pairs(named_program("genrm-both"), [PAIR], progress=False)
        assert len(engine.calls) == 2
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert sum(1 for _ in client.scan_iter("reflectagent:[0-9a-f]*")) == 2
    assert not (tmp_path / "default").exists()
