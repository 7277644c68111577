"""vLLM's OpenAI-compatible server (or llama.cpp's: :mod:`reflectagent.serving.llama_cpp`) as a managed child process.

The same class serves the embedded SmolLM2 on a laptop CPU and a Qwen3 ReflectRM on a GPU:
a base model folder, any number of LoRA adapters chosen per request by name, a free
loopback port, a readiness wait that fails with the server's own log tail, a clean
shutdown of the whole process group, and (where Linux allows) a server that dies with the
process that started it, so a killed run leaves no server behind.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reflectagent.errors import ReflectAgentError
from reflectagent.paths import server_dir
from reflectagent.vllm_plugin import PLUGIN_GROUP, PLUGIN_NAME
from reflectagent.serving.loopback import httpx_options
from reflectagent.serving.sources import DEFAULT_CONTEXT, DEFAULT_DTYPE

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# vLLM's CPU engine keeps one core per worker out of its compute threads, for its API server and engine
# core. On a small machine that is a large share of the compute (half of two cores), while those two
# processes need a few percent of a core (bench/README.md, "Engine threads"): below this many physical
# cores, the worker computes on all of them.
RESERVE_A_CORE_FROM = 4
# vLLM's CPU KV cache comes in blocks of 128 tokens and its prefix cache shares whole blocks only: of a judge's
# system message (about 330 tokens, the same in every call) it reused 256. Blocks of 32 reuse 320: the demo's
# prefix-cache hits rose from 52% to 65% of prompt tokens and its judgments/min 1.26x at the same accuracy
# (bench/README.md, "Engine threads"). vLLM's CPU attention takes any multiple of 32. Where ``nvidia-smi`` is
# found, vLLM's own default stands; a block size in ``ServerSpec.extra_args`` or a ``--config`` file wins.
CPU_BLOCK_SIZE = 32


class ServerError(ReflectAgentError, RuntimeError):
    """The server did not start or stopped answering; the message holds its log tail."""


def parent_death_hook():
    """A ``preexec_fn`` that makes the child get SIGTERM when the thread that started it ends, or
    None where Linux's ``prctl`` cannot be had (a warning says so). libc is looked up here, in the
    parent, so the hook itself cannot fail in the child. Spawn through :func:`spawn_for_life`,
    whose thread lives as long as the process: then "the thread ends" means "the process died".
    """
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError as exc:
        logger.warning(
            "cannot make the server die with this process (%s): stop it yourself if this process is killed", exc
        )
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def spawn_for_life(command: list[str], **popen) -> subprocess.Popen:
    """``Popen`` on one thread that lives as long as this process, with the parent-death hook, so the
    child dies with the process whichever thread asked for it (an eval worker, say), and only then."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reflectagent-spawner")
    return _spawner.submit(lambda: subprocess.Popen(command, preexec_fn=parent_death_hook(), **popen)).result()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


@dataclass
class ServerSpec:
    model_dir: str
    served_name: str = "base"
    loras: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int | None = None
    max_model_len: int = DEFAULT_CONTEXT
    max_lora_rank: int = 64
    dtype: str = DEFAULT_DTYPE
    extra_args: list[str] = field(default_factory=list)
    engine = "vLLM"  # what logs and errors call the server

    def command(self, port: int) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--disable-uvicorn-access-log",
            # JSON-schema outputs without free whitespace: otherwise a small model can fill its
            # whole token budget with blanks between the fields and lose the verdict.
            "--structured-outputs-config",
            json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        ]
        if not has_gpu():
            args.append("--enforce-eager")  # ENVIRONMENT.md: ready in ~30 s instead of ~90 s on CPU
            if not any(re.match(r"--(block[-_]size|config)(=|$)", a) for a in self.extra_args):
                args += ["--block-size", str(CPU_BLOCK_SIZE)]
        if self.loras:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--lora-modules"]
            args += [f"{name}={path}" for name, path in self.loras.items()]
        return args + list(self.extra_args)


def usable_cores() -> int:
    """The physical cores this process may run on: vLLM's CPU worker binds one compute thread to one logical CPU of
    each physical core, so a 4-vCPU machine with 2 hyperthreaded cores is a 2-core machine to it. Counted from the
    process's affinity (a container may allow fewer than ``os.cpu_count()``) and the kernel's topology."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
            )
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology to read: count the logical CPU as a core
    return len(cores) or 1


def server_env() -> dict[str, str]:
    """vLLM and torch.compile caches under our folder, not the home or temp folder; on CPU, the compute
    threads on every core of a small machine (``RESERVE_A_CORE_FROM``). A variable already set wins."""
    root = server_dir()
    env = dict(os.environ)
    env.setdefault("VLLM_CACHE_ROOT", str(root / "vllm-cache"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor-cache"))
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not has_gpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if usable_cores() < RESERVE_A_CORE_FROM:
            env.setdefault(RESERVED_CPU_ENV, "0")
        # One engine step (a batch's prefill) on a small, busy CPU can pass vLLM's 300 s limit; the engine
        # then dies ("RPC call to execute_model timed out", EngineDeadError: seen here under load).
        env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")
    return env


def lora_plugin_problems(env: dict[str, str]) -> list[str]:
    """Why vLLM processes started with ``env`` would not load reflectagent's plugin (:mod:`reflectagent.vllm_plugin`),
    which keeps a CPU server's LoRA adapters out of its base-model requests: the entry point is not installed (an
    editable install made before it was declared), or ``VLLM_PLUGINS``, vLLM's allow-list, leaves it out (read as vLLM
    reads it: names split on commas). A user's allow-list wins: it is told, never rewritten. None: an empty list."""
    harm = (
        "on this CPU server, a base-model request batched with an adapter's request will be computed with the "
        "adapter (vLLM's CPU LoRA ops; see reflectagent/vllm_plugin.py)"
    )
    problems = []
    if PLUGIN_NAME not in {entry.name for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP)}:
        problems.append(
            f"reflectagent's vLLM plugin ({PLUGIN_NAME}, entry point group {PLUGIN_GROUP}) is not installed "
            f"in this environment, so {harm}. A stale install: re-run scripts/install.sh (or pip install -e .)"
        )
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        problems.append(
            f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME}, so {harm}. Add {PLUGIN_NAME} to "
            "VLLM_PLUGINS (comma-separated, no spaces), or unset it to load every installed plugin"
        )
    return problems


class VLLMServer:
    """Start with :meth:`start` (or ``with``); :attr:`url` is the OpenAI base URL. ``spec`` says which engine
    and how: a :class:`ServerSpec` (vLLM) or a :class:`~reflectagent.serving.llama_cpp.LlamaCppSpec`."""

    def __init__(self, spec: ServerSpec, log_path: str | Path | None = None, die_with_parent: bool = False):
        self.spec = spec
        self.port = spec.port or free_port()
        slug = spec.engine.lower().replace(".", "")
        self.log_path = Path(log_path) if log_path else server_dir() / "logs" / f"{slug}-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.die_with_parent = die_with_parent
        self.ready_s: float | None = None  # how long the last start took to answer

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def child_env(self) -> dict[str, str]:
        """The server's environment (:func:`server_env`); on a CPU server with LoRA adapters, a warning for each reason
        its vLLM would not load the plugin that keeps the adapters out of base-model requests
        (:func:`lora_plugin_problems`)."""
        env = server_env()
        if hasattr(self.spec, "child_env"):  # an engine's own needs (llama.cpp's shared libraries)
            env = self.spec.child_env(env)
        if self.spec.loras and not has_gpu():
            for problem in lora_plugin_problems(env):
                logger.warning("%s", problem)
        return env

    def start(self, timeout_s: float = 600) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.spec.command(self.port)
        logger.info("starting %s: %s (log: %s)", self.spec.engine, " ".join(command), self.log_path)
        with open(self.log_path, "wb") as log:
            popen = dict(stdout=log, stderr=subprocess.STDOUT, env=self.child_env(), start_new_session=True)
            self.process = (
                spawn_for_life(command, **popen) if self.die_with_parent else subprocess.Popen(command, **popen)
            )
        try:
            return self._wait_ready(timeout_s)
        except BaseException:  # not ready, a probe that raised, Ctrl-C: no child is left running unseen
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> str:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.spec.engine} exited with code {self.process.returncode} before it was ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            if is_serving(self.url):
                self.ready_s = time.monotonic() - started
                logger.info("%s ready at %s after %.0f s", self.spec.engine, self.url, self.ready_s)
                return self.url
            time.sleep(0.5)
        raise ServerError(f"{self.spec.engine} did not answer within {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def served_models(url: str) -> dict[str, dict] | None:
    """An OpenAI-compatible server's models by id (vLLM adds ``root``, ``max_model_len``, ``parent``), or None. A
    server on this machine is asked directly, never through the environment's proxy (:mod:`~reflectagent.serving.loopback`)."""
    try:
        response = httpx.get(url.rstrip("/") + "/models", timeout=2.0, **httpx_options(url))
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return {m.get("id"): m for m in response.json().get("data", [])}


def is_serving(url: str, model: str | None = None) -> bool:
    """True when an OpenAI-compatible server at ``url`` lists its models (and ``model``, if given)."""
    models = served_models(url)
    return models is not None and (model is None or model in models)
