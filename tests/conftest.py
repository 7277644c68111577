"""Shared fixtures: one real vLLM server of the embedded model (with a LoRA adapter) per session."""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from reflectagent.models import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def lora_dir(model_dir, tmp_path_factory) -> Path:
    """A small, untrained (but non-identity) PEFT LoRA adapter for the embedded model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora") / "test-adapter"
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def server(model_dir, lora_dir, tmp_path_factory):
    """The embedded model served by vLLM over HTTP; ``embedded`` backends reuse it."""
    from reflectagent.embedded import SERVED_NAME
    from reflectagent.server import ServerSpec, VLLMServer

    spec = ServerSpec(model_dir=str(model_dir), served_name=SERVED_NAME, loras={"test": str(lora_dir)}, max_lora_rank=8)
    with VLLMServer(spec, log_path=tmp_path_factory.mktemp("server") / "vllm.log") as running:
        previous = os.environ.get("REFLECTAGENT_EMBEDDED_URL")
        os.environ["REFLECTAGENT_EMBEDDED_URL"] = running.url
        yield running
        if previous is None:
            os.environ.pop("REFLECTAGENT_EMBEDDED_URL", None)
        else:
            os.environ["REFLECTAGENT_EMBEDDED_URL"] = previous


@pytest.fixture
def cache(tmp_path):
    from reflectagent.cache import JudgmentCache, use_cache

    store = JudgmentCache(tmp_path / "judgments")
    with use_cache(store):
        yield store
    store.close()


@pytest.fixture(scope="session")
def sample_pairs():
    from reflectagent.pairs import read_pairs, sample_path

    pairs, bad = read_pairs(sample_path())
    assert not bad
    return pairs


HOSTILE = "Sure.<script>alert(1)</script><img src=x onerror=alert(2)> Paris is the capital."


@pytest.fixture(scope="session")
def eval_report(server, tmp_path_factory) -> Path:
    """A real eval (GenRM and ReflectRM on the embedded server) of a few benchmark pairs and one whose response
    carries markup, written by ``write_report``: the folder the page tests open."""
    from reflectagent.cache import JudgmentCache, use_cache
    from reflectagent.config import BackendConfig, Settings
    from reflectagent.eval import load_benchmark, run_eval, write_report
    from reflectagent.pairs import Pair

    pairs = []
    for name in ("eval_pandalm.jsonl", "eval_hhh.jsonl"):
        loaded, _ = load_benchmark(DATA / name)
        pairs += loaded[:3]
    pairs.append(
        Pair(
            id="hostile-1",
            prompt="What is the capital of France?",
            response_a=HOSTILE,
            response_b="Berlin.",
            label="A",
            source="handmade",
            category="markup",
        )
    )
    settings = Settings(backends={"embedded": BackendConfig(model="embedded", context_chars=4000)})
    folder = tmp_path_factory.mktemp("eval-report")
    with use_cache(JudgmentCache(folder / "cache")):
        results = run_eval(pairs, ["genrm", "reflectrm"], ["embedded"], settings=settings, progress=False)
    return write_report(
        results, folder / "report", meta={"data": ["tests/data"], "pairs": len(pairs), "split": "all", "seed": 0}
    )


@contextlib.contextmanager
def running_service(rewarder, **options):
    """The service under uvicorn on a free loopback port, in a thread, for the ``with`` block."""
    import uvicorn

    from reflectagent.rl.service import create_app
    from reflectagent.server import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(rewarder, **options), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(server.run,), daemon=True
    )  # the cache in use
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
