"""The peer baseline: MT-Bench's pairwise judge prompt (Zheng et al., 2023, FastChat ``pair-v2``), as written.

This is how most people judge with an LLM today: free text, then ``[[A]]``, ``[[B]]`` or ``[[C]]``
(a tie). It is here to be measured against, on the same model and the same pairs as GenRM and
ReflectRM: both orders, a verdict only when they agree, a tie or an unparsable answer is no
verdict. Its steps go through the judgment cache like every other step.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

import dspy
from dspy.utils.exceptions import AdapterParseError

from reflectagent.calling.steps import arun_step
from reflectagent.judging.base import Judge
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis, Judgment, flip

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two "
    "responses and provide a short explanation. Avoid any position biases and ensure that the order in which the "
    "responses were presented does not influence your decision. Do not allow the length of the responses to influence "
    "your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your "
    'explanation, output your final verdict by strictly following this format: "[[A]]" if assistant A is better, '
    '"[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
USER = (
    "[User Question]\n{prompt}\n\n[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]"
    "\n\n[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


class PeerVerdict(dspy.Signature):
    """MT-Bench's pairwise verdict (rendered by :class:`MTBenchAdapter`, not from this text)."""

    prompt: str = dspy.InputField()
    response_a: str = dspy.InputField()
    response_b: str = dspy.InputField()
    explanation: str = dspy.OutputField()
    verdict: Literal["A", "B", "C"] = dspy.OutputField()


class MTBenchAdapter(dspy.Adapter):
    """The prompt exactly as MT-Bench writes it; the verdict is the last ``[[X]]`` in the answer."""

    def describe(self) -> list:
        return [type(self).__name__, "pair-v2"]

    def format(self, signature, demos, inputs: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER.format(**inputs)}]

    def parse(self, signature, completion: str) -> dict[str, Any]:
        found = _VERDICT.findall(completion)
        if not found:
            error = AdapterParseError(
                adapter_name=type(self).__name__,
                signature=signature,
                lm_response=completion,
                message="no [[A]], [[B]] or [[C]] in the answer",
            )
            error.reason = "no [[A]], [[B]] or [[C]] in the answer"
            raise error
        return {"explanation": completion[: completion.rfind("[[")].strip(), "verdict": found[-1]}


class MTBenchJudge(Judge):
    """MT-Bench's judge in both orders: a verdict when both name the same response; a tie is no verdict."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict(PeerVerdict)
        self.adapter = MTBenchAdapter()

    async def verdict(self, pair: Pair, swapped: bool) -> Analysis:
        shown = pair.swapped() if swapped else pair
        step = await arun_step(self.predict, shown.inputs(), adapter=self.adapter)
        said = (step.fields or {}).get("verdict")
        preference = None if said in (None, "C") else (flip(said) if swapped else said)
        return Analysis(
            text=(step.fields or {}).get("explanation", ""),
            preference=preference,
            swapped=swapped,
            parsed=step.parsed,
            raw=step.raw,
            error=step.error,
            usage=step.usage,
            cached=step.cached,
            truncated=step.truncated,
        )

    async def adecide(self, pair: Pair) -> Judgment:
        analyses = tuple(await asyncio.gather(self.verdict(pair, False), self.verdict(pair, True)))
        if not all(a.parsed for a in analyses):
            return Judgment(preference=None, analyses=analyses, reason="unparsed")
        verdicts = {a.preference for a in analyses}
        if None in verdicts:
            return Judgment(preference=None, analyses=analyses, reason="tie")
        if len(verdicts) > 1:
            return Judgment(preference=None, analyses=analyses, reason="inconsistent across orders")
        return Judgment(preference=verdicts.pop(), analyses=analyses)
