"""A server started by reflectagent dies with the process that started it, where Linux allows."""

import logging
import os
import subprocess
import sys
import time

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
    code = ("import threading, time, subprocess; from reflectagent.server import spawn_for_life\n"
            "box = []\n"
            "worker = threading.Thread(target=lambda: box.append(spawn_for_life(['sleep', '60'])))\n"
            "worker.start(); worker.join(); time.sleep(1.5)\n"
            "print(box[0].pid, box[0].poll() is None, flush=True)\n")
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
