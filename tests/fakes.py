"""Deterministic fake LMs (DSPy's DummyLM), a model-free judge, for control-flow tests; and the fake
engine (``bench/fake_engine.py``) as a real server process on loopback, for faults."""

import asyncio
import importlib.util
import threading
from pathlib import Path

import httpx
from dspy.utils.dummies import DummyLM

from reflectagent.adapter import JudgeAdapter
from reflectagent.judge import Judge
from reflectagent.pairs import Pair
from reflectagent.results import Judgment

GOOD, BAD = "The capital of France is Paris.", "The capital of France is Berlin."
PAIR = Pair(prompt="What is the capital of France?", response_a=GOOD, response_b=BAD, label="A")


def fake(answers: dict) -> DummyLM:
    """Answers chosen by the first key found in the last message (the request's inputs)."""
    return DummyLM(answers, adapter=JudgeAdapter())


def fair_analyst() -> DummyLM:
    """Prefers whichever position holds GOOD: no position bias."""
    return fake(
        {
            f"[[ ## response_a ## ]]\n{GOOD}": {"analysis": "A is right", "preference": "A"},
            f"[[ ## response_b ## ]]\n{GOOD}": {"analysis": "B is right", "preference": "B"},
        }
    )


def biased_analyst(position: str = "A") -> DummyLM:
    """Always names the same position."""
    return fake({"": {"analysis": "the first looks fine", "preference": position}})


def reflective(reflector_bias: str | None = None) -> DummyLM:
    """Analyses right when GOOD is shown first, wrong when swapped; reflection trusts the
    analysis that mentions Paris (or, with ``reflector_bias``, always that position)."""
    reflect = (
        {"[[ ## analysis_1 ## ]]": {"reflection": "position", "more_reliable": reflector_bias}}
        if reflector_bias
        else {
            "[[ ## analysis_1 ## ]]\nParis is correct": {
                "reflection": "the first checks the facts",
                "more_reliable": "1",
            },
            "[[ ## analysis_2 ## ]]\nParis is correct": {
                "reflection": "the second checks the facts",
                "more_reliable": "2",
            },
        }
    )
    return fake(
        {
            **reflect,
            f"[[ ## response_a ## ]]\n{GOOD}": {"analysis": "Paris is correct", "preference": "A"},
            f"[[ ## response_a ## ]]\n{BAD}": {"analysis": "Berlin sounds right", "preference": "A"},
        }
    )


class ScoreJudge(Judge):
    """A model-free judge: the response with the higher number wins; equal numbers, no verdict."""

    def __init__(self):
        super().__init__()

    def decide(self, pair: Pair) -> Judgment:
        a, b = float(pair.response_a), float(pair.response_b)
        if a == b:
            return Judgment(preference=None, reason="tie")
        return Judgment(preference="A" if a > b else "B")


ENGINE = Path(__file__).resolve().parents[1] / "bench" / "fake_engine.py"
_spec = importlib.util.spec_from_file_location("fake_engine", ENGINE)
fake_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_engine)


def fake_api_backend(api_base: str):
    """A LiteLLM backend on the fake engine, as a hosted API: plain text (no constrained output, no log-probs),
    its key in ``$FAKE_KEY``, no retry (a test sees each failure)."""
    from reflectagent.calling.config import BackendConfig

    return BackendConfig(
        model="openai/fake", api_base=api_base, api_key_env="FAKE_KEY", constrained=False, logprobs=False, num_retries=0
    )


class LoopThread:
    """A server on its own event loop, in a thread of the test's own process: ``start()`` (a coroutine that sets
    ``self.server`` and returns the port) runs on that loop; open keep-alive connections end with it. A context
    manager; ``port`` is set on entry."""

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ThreadEngine(LoopThread, fake_engine.FakeEngine):
    """The fake engine served from a thread of the test's own process: ``calls``, ``keys`` and ``delay_s``
    are read and set directly. A context manager."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"


class Engine:
    """The fake engine in its own process, on a fixed port so that it can die and come back there."""

    def __init__(self, *flags, port=None):
        self.process, self.url = fake_engine.spawn(*flags, port=port)
        self.port = int(self.url.rsplit(":", 1)[1])

    def count(self) -> int:
        return httpx.get(f"{self.url}/count", timeout=5).json()["chat"]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
