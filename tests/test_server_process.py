"""A server started by reflectagent dies with the process that started it, where Linux allows."""

import logging
import os
import subprocess
import sys
import threading
import time

from reflectagent import server


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its reaper is dead too
        return stat.read().split(")")[1].split()[0] != "Z"


def test_a_child_started_with_the_hook_dies_with_its_parent():
    code = ("import subprocess; from reflectagent.server import parent_death_hook; "
            "child = subprocess.Popen(['sleep', '60'], preexec_fn=parent_death_hook()); print(child.pid, flush=True)")
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    pid = int(parent.stdout.strip())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_no_hook_off_the_main_thread_or_without_libc(monkeypatch, caplog):
    found = []
    worker = threading.Thread(target=lambda: found.append(server.parent_death_hook()))
    worker.start()
    worker.join()
    assert found == [None]  # Linux would kill the child when that *thread* ends

    def no_libc(*args, **kwargs):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(server.ctypes, "CDLL", no_libc)
    with caplog.at_level(logging.WARNING, logger="reflectagent.server"):
        assert server.parent_death_hook() is None
    assert "cannot make the server die with this process" in caplog.text  # said, not swallowed
