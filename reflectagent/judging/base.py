"""What every judge shares: ``Judge`` validates the pair, answers identical responses without asking a model, times
the call and collects notes, and stops a judge that decides by probability on an LM without log-probs
(:mod:`~reflectagent.judging.decisions`); subclasses only decide, async first (``adecide``: its steps run at once on
one event loop) or sync (``decide``: run in a thread when judged from async code). A program saves and loads its
options and compiled state."""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import dspy

from reflectagent import __version__
from reflectagent.calling.concurrency import run_sync
from reflectagent.errors import ReflectAgentError
from reflectagent.judging.decisions import require_logprobs, require_verdict_logprobs
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment


class ProgramFileError(ReflectAgentError, ValueError):
    """A saved program that is not the program (or version) being loaded."""


class Judge(dspy.Module):
    """Base class: ``forward(prompt, response_a, response_b) -> Judgment``.

    Subclasses pass their constructor options to ``super().__init__(**options)`` so that a
    saved program can be rebuilt exactly; bump ``version`` when a program's structure (its
    predictors or how it decides) changes, so old files are refused instead of misread.
    """

    version = 1

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, prompt: str, response_a: str, response_b: str, **_) -> Judgment:
        return self.judge(Pair(prompt=prompt, response_a=response_a, response_b=response_b))

    async def aforward(self, prompt: str, response_a: str, response_b: str, **_) -> Judgment:
        return await self.ajudge(Pair(prompt=prompt, response_a=response_a, response_b=response_b))

    def judge(self, pair: Pair) -> Judgment:
        started = time.perf_counter()
        lms = self._logprobs_needed()
        if pair.identical:
            return self._finish(pair, self._identical(), started)
        judgment = self.decide(pair) if self._decides_sync() else run_sync(self.adecide(pair))
        return self._finish(pair, self._with_logprobs(judgment, lms), started)

    async def ajudge(self, pair: Pair) -> Judgment:
        started = time.perf_counter()
        lms = self._logprobs_needed()
        if pair.identical:
            return self._finish(pair, self._identical(), started)
        judgment = await (_in_thread(self.decide, pair) if self._decides_sync() else self.adecide(pair))
        return self._finish(pair, self._with_logprobs(judgment, lms), started)

    @property
    def needs_logprobs(self) -> bool:
        """Whether this judge's verdict needs the verdict token's log-probabilities: it decides by probability. A
        judge made of judges that decide for it (a cascade, a ladder, a calibration) leaves it to them."""
        return self.options.get("decision") == "probability"

    def check_logprobs(self) -> None:
        """Raise :class:`~reflectagent.judging.decisions.LogprobsUnavailable` now, not at the first pair, where this
        judge or one inside it (a cascade's rung, a calibration's program) decides by probability on an LM, in
        force now, that does not ask for log-probs: for a service that takes requests later."""
        for _, module in self.named_sub_modules():
            if isinstance(module, Judge):
                module._logprobs_needed()

    def _logprobs_needed(self) -> list | None:
        """Before any call: the LMs this judge's steps run on (each predictor's, else DSPy's in force), where it
        needs log-probs and every one of them can give them (:func:`~reflectagent.judging.decisions.require_logprobs`
        raises where a backend does not ask for them); None where it does not need them."""
        if not self.needs_logprobs:
            return None
        lms = list(
            {id(lm): lm for lm in (p.lm or dspy.settings.lm for p in self.predictors()) if lm is not None}.values()
        )
        require_logprobs(self._described(), lms)
        return lms

    def _with_logprobs(self, judgment: Judgment, lms: list | None) -> Judgment:
        """After the calls: the judgment, unless a parsed verdict of its own came back without log-probs from an
        LM asked for them (:func:`~reflectagent.judging.decisions.require_verdict_logprobs` raises)."""
        if lms:
            require_verdict_logprobs(self._described(), judgment.analyses + judgment.ratings, lms)
        return judgment

    def _described(self) -> str:
        return f"{type(self).__name__} (decision='probability')"

    def _decides_sync(self) -> bool:
        """Whether this judge's most derived decision is ``decide`` (sync) rather than ``adecide``: a subclass
        that overrides either is judged by its override, on the sync and the async path alike."""
        for cls in type(self).__mro__:
            if cls is Judge:
                raise NotImplementedError(f"{type(self).__name__} defines neither decide nor adecide")
            if "adecide" in vars(cls):
                return False
            if "decide" in vars(cls):
                return True
        raise NotImplementedError(type(self).__name__)

    @staticmethod
    def _identical() -> Judgment:
        return Judgment(preference=None, reason="identical responses: there is nothing to prefer")

    def _finish(self, pair: Pair, judgment: Judgment, started: float) -> Judgment:
        notes = list(judgment.notes)
        for name in ("response_a", "response_b"):
            if not getattr(pair, name).strip():
                notes.append(f"{name} is empty")
        cut = sorted({field for step in judgment.steps for field in step.truncated})
        if cut:
            notes.append(f"truncated to fit the context: {', '.join(cut)}")
        return replace(
            judgment, latency_s=time.perf_counter() - started, notes=tuple(notes), program=type(self).__name__
        )

    def decide(self, pair: Pair) -> Judgment:
        """The verdict for a pair (never identical responses). A program that defines ``adecide`` gets this."""
        return run_sync(self.adecide(pair))

    async def adecide(self, pair: Pair) -> Judgment:
        """The verdict, async. A judge that defines only ``decide`` (sync) is run in a thread."""
        return await _in_thread(self.decide, pair)

    def save(self, path: str | Path) -> Path:
        """Write the program's identity, options and compiled state (demos, instructions) as JSON."""
        payload = {
            "reflectagent": {"program": type(self).__name__, "version": self.version, "library": __version__},
            "options": self.options,
            # Backends are configuration, not part of a program: predictor LMs are not saved.
            "state": {name: {**state, "lm": None} for name, state in self.dump_state().items()},
        }
        path = Path(path)
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        """Rebuild a program saved by :meth:`save`; another program or version is an error."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            meta = payload["reflectagent"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProgramFileError(f"{path} is not a saved reflectagent program: {exc}") from exc
        if meta.get("program") != cls.__name__:
            raise ProgramFileError(f"{path} holds a {meta.get('program')} program, not {cls.__name__}")
        if meta.get("version") != cls.version:
            raise ProgramFileError(
                f"{path} was saved by {cls.__name__} version {meta.get('version')}; this is version {cls.version}"
            )
        program = cls(**payload.get("options", {}))
        lms = [(predictor, predictor.lm) for predictor in program.predictors()]
        program.load_state(payload["state"])
        for predictor, lm in lms:  # keep the LMs the constructor chose (e.g. ensemble members' backends)
            predictor.lm = lm
        return program


_sync_judges = ThreadPoolExecutor(max_workers=256, thread_name_prefix="reflectagent-sync-judge")


async def _in_thread(decide, pair: Pair) -> Judgment:
    """A sync ``decide`` from async code, in the caller's context, on threads of its own: it may wait on
    steps that need the event loop's executor, so it must never hold one of that executor's threads."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_sync_judges, context.run, decide, pair)
