"""A server started by reflectagent dies with the process that started it, where Linux allows."""

import logging
import os
import subprocess
import sys
import time

import pytest

from reflectagent import server


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its reaper is dead too
        return stat.read().split(")")[1].split()[0] != "Z"


def wait_dead(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_a_child_spawned_from_a_short_lived_thread_lives_until_its_process_dies():
    """Started from a worker thread that ends at once (as an eval worker does), the child must outlive
    that thread, and die with the process."""
    code = (
        "import threading, time, subprocess; from reflectagent.server import spawn_for_life\n"
        "box = []\n"
        "worker = threading.Thread(target=lambda: box.append(spawn_for_life(['sleep', '60'])))\n"
        "worker.start(); worker.join(); time.sleep(1.5)\n"
        "print(box[0].pid, box[0].poll() is None, flush=True)\n"
    )
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    pid, running = parent.stdout.split()
    assert running == "True"  # alive after the thread that asked for it ended
    assert wait_dead(int(pid))  # and gone once the process ended


def test_no_hook_without_libc_says_so(monkeypatch, caplog):
    def no_libc(*args, **kwargs):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(server.ctypes, "CDLL", no_libc)
    with caplog.at_level(logging.WARNING, logger="reflectagent.server"):
        assert server.parent_death_hook() is None
    assert "cannot make the server die with this process" in caplog.text  # said, not swallowed


def test_on_a_small_cpu_machine_the_engine_computes_on_every_core(monkeypatch):
    """vLLM's CPU backend keeps a core out of its compute threads by default: half of a two-core machine.
    Below ``RESERVE_A_CORE_FROM`` usable cores none is kept; above, vLLM's own default stands; a value
    the user set is never overridden."""
    monkeypatch.delenv(server.RESERVED_CPU_ENV, raising=False)
    monkeypatch.setattr(server, "has_gpu", lambda: False)
    monkeypatch.setattr(server, "usable_cores", lambda: 2)
    assert server.server_env()[server.RESERVED_CPU_ENV] == "0"
    monkeypatch.setattr(server, "usable_cores", lambda: server.RESERVE_A_CORE_FROM)
    assert server.RESERVED_CPU_ENV not in server.server_env()
    monkeypatch.setattr(server, "usable_cores", lambda: 2)
    monkeypatch.setenv(server.RESERVED_CPU_ENV, "1")
    assert server.server_env()[server.RESERVED_CPU_ENV] == "1"
    monkeypatch.setattr(server, "has_gpu", lambda: True)
    monkeypatch.delenv(server.RESERVED_CPU_ENV)
    assert server.RESERVED_CPU_ENV not in server.server_env()


def test_on_cpu_the_kv_cache_comes_in_small_blocks_unless_the_user_says_otherwise(monkeypatch):
    """vLLM's CPU prefix cache shares whole 128-token blocks only; the judge's prompts share more in blocks of 32.
    A block size in ``extra_args`` (in any of vLLM's spellings) or a config file wins, and on a GPU vLLM's own
    default stands."""

    def block_sizes(spec):
        args = spec.command(port=1)
        return [args[i + 1] for i, a in enumerate(args) if a == "--block-size"] + [
            a.split("=", 1)[1] for a in args if a.startswith("--block-size=")
        ]

    monkeypatch.setattr(server, "has_gpu", lambda: False)
    assert block_sizes(server.ServerSpec(model_dir="m")) == [str(server.CPU_BLOCK_SIZE)]
    assert block_sizes(server.ServerSpec(model_dir="m", extra_args=["--block-size", "64"])) == ["64"]
    assert block_sizes(server.ServerSpec(model_dir="m", extra_args=["--block-size=16"])) == ["16"]
    assert "--block-size" not in server.ServerSpec(model_dir="m", extra_args=["--block_size", "64"]).command(port=1)
    assert "--block-size" not in server.ServerSpec(model_dir="m", extra_args=["--config", "vllm.yaml"]).command(port=1)
    assert block_sizes(server.ServerSpec(model_dir="m", extra_args=["--block-sizes-are-not-a-flag"])) == ["32"]
    monkeypatch.setattr(server, "has_gpu", lambda: True)
    assert block_sizes(server.ServerSpec(model_dir="m")) == []


class FakeVLLM(server.ServerSpec):
    """The fake engine (``bench/fake_engine.py``) started as if it were vLLM: same process handling, no model."""

    def command(self, port: int) -> list[str]:
        from fakes import ENGINE

        return [sys.executable, str(ENGINE), str(port), "--context", "2048"]


def no_proxy_but(monkeypatch, **proxies: str) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in proxies.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("proxies", [{"ALL_PROXY": "socks5://proxy.example:1080"}, "a dead HTTP proxy"])
def test_a_starting_server_is_asked_directly_whatever_proxy_the_environment_names(proxies, monkeypatch, tmp_path):
    """The readiness wait (httpx) sent its probe for 127.0.0.1 to the environment's proxy: with a SOCKS ``ALL_PROXY``
    it raised ImportError (no socksio) and left the child running; with ``HTTP_PROXY`` and no ``no_proxy`` it asked
    the proxy until its 600 s were up. The loopback is asked directly, as the step path's own client asks it."""
    if not isinstance(proxies, dict):
        proxies = {"HTTP_PROXY": f"http://127.0.0.1:{server.free_port()}"}  # nothing listens there
    no_proxy_but(monkeypatch, **proxies)
    monkeypatch.setenv("REFLECTAGENT_SERVER_DIR", str(tmp_path))
    fake = server.VLLMServer(FakeVLLM(model_dir="unused"), log_path=tmp_path / "fake.log")
    try:
        assert fake.start(timeout_s=20) == f"http://127.0.0.1:{fake.port}/v1"
        assert server.served_models(fake.url) == {"fake": {"id": "fake", "object": "model", "max_model_len": 2048}}
    finally:
        child = fake.process
        fake.stop()
    assert child is not None and wait_dead(child.pid)


def test_a_readiness_probe_that_raises_stops_the_child_it_waited_for(monkeypatch, tmp_path):
    """Anything the readiness wait raises (here a probe's own error) stops the child before it is raised: no vLLM is
    left running unseen, holding its memory and port."""
    started = []
    real_popen = server.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def probe(url, model=None):
        raise RuntimeError("the probe broke")

    monkeypatch.setattr(server.subprocess, "Popen", popen)
    monkeypatch.setattr(server, "is_serving", probe)
    monkeypatch.setenv("REFLECTAGENT_SERVER_DIR", str(tmp_path))
    fake = server.VLLMServer(FakeVLLM(model_dir="unused"), log_path=tmp_path / "fake.log")
    with pytest.raises(RuntimeError, match="the probe broke"):
        fake.start(timeout_s=20)
    assert len(started) == 1 and wait_dead(started[0].pid) and fake.process is None


def test_a_cpu_server_with_adapters_says_when_vllm_would_not_load_the_lora_mend(monkeypatch, caplog):
    """vLLM's CPU LoRA ops give a base-model request batched with an adapter's the adapter (``vllm_plugin``); nothing
    said when the plugin that mends them would not load: left out by a user's ``VLLM_PLUGINS`` allow-list (which
    wins: it is not rewritten), or not installed (a stale editable install). Told before the server starts; a GPU
    server or one without adapters needs no mend."""
    import importlib.metadata

    from reflectagent import vllm_plugin

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    installed = importlib.metadata.entry_points(group=vllm_plugin.PLUGIN_GROUP)
    assert vllm_plugin.PLUGIN_NAME in installed.names  # what the check looks for is what pyproject.toml declares
    assert server.lora_plugin_problems({}) == []
    assert server.lora_plugin_problems({"VLLM_PLUGINS": f"lora_filesystem_resolver,{vllm_plugin.PLUGIN_NAME}"}) == []
    left_out = server.lora_plugin_problems({"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert (
        len(left_out) == 1 and "VLLM_PLUGINS='lora_filesystem_resolver' leaves out reflectagent_cpu_lora" in left_out[0]
    )
    assert "computed with the adapter" in left_out[0]
    assert server.lora_plugin_problems({"VLLM_PLUGINS": ""})  # vLLM loads no plugin at all

    monkeypatch.setattr(server.importlib.metadata, "entry_points", lambda **kw: importlib.metadata.EntryPoints(()))
    stale = server.lora_plugin_problems({})
    assert len(stale) == 1 and "scripts/install.sh" in stale[0] and "computed with the adapter" in stale[0]

    spec = server.ServerSpec(model_dir="m", loras={"judge": "/adapters/judge"})
    monkeypatch.setattr(server, "has_gpu", lambda: False)
    with caplog.at_level(logging.WARNING, logger="reflectagent"):
        env = server.VLLMServer(spec, log_path="unused.log").child_env()
    assert "VLLM_PLUGINS" not in env  # told, not changed
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "scripts/install.sh" in caplog.text
    caplog.clear()
    for quiet in (server.ServerSpec(model_dir="m"), spec):
        monkeypatch.setattr(server, "has_gpu", lambda: quiet is spec)
        with caplog.at_level(logging.WARNING, logger="reflectagent"):
            server.VLLMServer(quiet, log_path="unused.log").child_env()
    assert not caplog.records
