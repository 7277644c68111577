"""Rewards from judgments, never from a guessed verdict, and an explicit abstain where there was none.

Against a reference, the response is shown as A and the reference as B (the judge handles order:
a both-orders program averages it away); the reward is the judgment's P(A better) where the backend
gives verdict probabilities, else 1 for a win and 0 for a loss. In a group, the responses to the same
prompt are judged together (:mod:`reflectagent.rl.groups`: identical ones once, every pair shown in one
order so the cache answers it again, round robin up to ``round_robin_up_to`` distinct responses and a
tournament above) and each response's reward is its win rate (in [0, 1]) or its Bradley-Terry
log-strength (mean 0), ``programs.ranking`` doing the counting. A comparison with no verdict counts as
its P(A) or a draw there, as in ranking. A response with no verdict at all (against its reference,
alone in its group, identical to every other response of its group, or in a pair that cannot be judged,
such as two empty responses) *abstains*: ``Reward.abstain`` is True, and each trainer adapter says so in
its own way (:mod:`reflectagent.rl.adapters`: ``None`` for TRL, which masks it; a flag beside the reward
where the trainer needs a number). The number it carries is ``no_verdict_reward``, by default the neutral
value of the reward's scale (0.5 for probabilities and win rates, 0.0 for Bradley-Terry log-strengths,
their mean), never a silent 0. A calibrated program (:class:`~reflectagent.programs.Calibrated`, given as
the path of its saved file) rewards with its calibrated P(A).

Every judgment of a batch is charged to exactly one of its rewards (a group's comparison to the response
shown first), so the batch's ``judgments``, ``usage`` and ``cache_hits`` add up to what it took.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import dspy

from reflectagent.calling.backends import resolve_backend
from reflectagent.calling.concurrency import run_sync
from reflectagent.calling.config import Settings
from reflectagent.errors import ReflectAgentError
from reflectagent.judging.base import Judge
from reflectagent.programs import resolve_program
from reflectagent.programs.ranking import Ranking
from reflectagent.records.pairs import InvalidPair, Pair
from reflectagent.records.results import Judgment, Usage
from reflectagent.rl import groups

NO_VERDICT_REWARD = 0.5  # neither better nor worse on a [0, 1] scale: the documented default, always flagged
MAX_GROUP = 64  # larger groups are refused, not queued (64 distinct responses take 63 judgments, a tournament)
GroupMethod = Literal["win_rate", "bradley_terry"]


class GroupTooLarge(ReflectAgentError, ValueError):
    """A group over ``max_group``: refused before any judging."""


@dataclass(frozen=True)
class Reward:
    """One response's reward, the [0, 1] score behind it, whether a verdict stood behind it, and the judgments
    charged to it (each judgment of a batch is charged to one reward: see the module)."""

    reward: float
    score: float  # in [0, 1]: P(better than the reference), or the win rate in the group
    verdict: bool  # False: no comparison reached a verdict or a probability; reward is the no-verdict value
    reason: str | None = None
    usage: Usage = Usage()
    cache_hits: int = 0
    judgments: tuple[Judgment, ...] = ()

    @property
    def abstain(self) -> bool:
        """No verdict or probability stood behind this reward: a trainer should not learn from its number."""
        return not self.verdict


def _cost(judgments: list[Judgment]) -> tuple[Usage, int]:
    return sum((j.usage for j in judgments), Usage()), sum(j.cache_hits for j in judgments)


class Rewarder:
    """Rewards from one judge on one backend; every step goes through the judgment cache in use.

    ``judge`` is a program, a named program (``"genrm-prob"``) or the path of a saved one (``calibrated.json``).
    ``round_robin_up_to``: the most distinct responses a group judges every two of; a larger group is a tournament."""

    def __init__(
        self,
        judge: Judge | str = "genrm-prob",
        backend: str | None = None,
        settings: Settings | None = None,
        *,
        lm: dspy.BaseLM | None = None,
        group: GroupMethod = "win_rate",
        no_verdict_reward: float | None = None,
        concurrency: int = 8,
        max_group: int = MAX_GROUP,
        round_robin_up_to: int = groups.ROUND_ROBIN_UP_TO,
    ):
        if group not in ("win_rate", "bradley_terry"):
            raise ValueError(f"group must be 'win_rate' or 'bradley_terry', not {group!r}")
        self.judge = resolve_program(judge) if isinstance(judge, str) else judge
        self.lm = lm or resolve_backend(backend, settings)
        self.group_method, self.concurrency, self.max_group = group, concurrency, max_group
        self.round_robin_up_to = round_robin_up_to
        neutral = 0.0 if group == "bradley_terry" else NO_VERDICT_REWARD
        self.no_verdict_reward = neutral if no_verdict_reward is None else no_verdict_reward
        with dspy.context(lm=self.lm):  # a probability judge on a backend without log-probs: told at start, not
            self.judge.check_logprobs()  # as an error on every request

    @property
    def name(self) -> str:
        return type(self.judge).__name__

    def judge_pair(self, pair: Pair) -> Judgment:
        return run_sync(self.ajudge_pair(pair))

    async def ajudge_pair(self, pair: Pair, gate: asyncio.Semaphore | None = None) -> Judgment:
        with dspy.context(lm=self.lm, trace=None):  # rewards feed no optimiser: keep no trace of every call
            if gate is None:
                return await self.judge.ajudge(pair)
            async with gate:
                return await self.judge.ajudge(pair)

    def rank(self, prompt: str, responses: list[str]) -> Ranking:
        """The responses judged as one group (:func:`reflectagent.rl.groups.ajudge_group`) on this rewarder's
        judge and backend."""
        return run_sync(self.arank(prompt, responses))

    async def arank(self, prompt: str, responses: list[str], gate: asyncio.Semaphore | None = None) -> Ranking:
        with dspy.context(lm=self.lm, trace=None):
            return await groups.ajudge_group(
                self.judge,
                prompt,
                responses,
                round_robin_up_to=self.round_robin_up_to,
                concurrency=self.concurrency,
                gate=gate,
            )

    def _check_group_size(self, n: int) -> None:
        if n > self.max_group:
            raise GroupTooLarge(
                f"a group of {n} responses to one prompt is over max_group ({self.max_group}): send smaller groups"
            )

    def judgments_needed(
        self, prompts: list[str], references: list[str | None] | None = None, *, responses: list[str] | None = None
    ) -> int:
        """How many judgments :meth:`rewards` makes for this batch, counted before any is made: one per response
        with a reference, and per group of responses to one prompt what judging it together takes (N(N-1)/2 for
        N distinct responses up to ``round_robin_up_to``, N - 1 above; without ``responses``, every response is
        taken as distinct). A service caps it per request: one small request must not become thousands of LM calls."""
        references = references or [None] * len(prompts)
        texts = responses if responses is not None else [str(i) for i in range(len(prompts))]
        members: dict[str, list[str]] = defaultdict(list)
        for prompt, text, reference in zip(prompts, texts, references):
            if not reference:
                members[prompt].append(text)
        return sum(1 for r in references if r) + sum(
            groups.judgments_needed(m, self.round_robin_up_to) for m in members.values()
        )

    def _no_verdict(self, reason: str, charged: tuple[Judgment, ...] = ()) -> Reward:
        usage, hits = _cost(list(charged))
        return Reward(self.no_verdict_reward, NO_VERDICT_REWARD, False, reason, usage, hits, charged)

    def against_reference(self, prompt: str, response: str, reference: str) -> Reward:
        return run_sync(self.aagainst_reference(prompt, response, reference))

    async def aagainst_reference(
        self, prompt: str, response: str, reference: str, gate: asyncio.Semaphore | None = None
    ) -> Reward:
        try:
            pair = Pair(prompt=prompt, response_a=response, response_b=reference)
        except InvalidPair as exc:
            return self._no_verdict(f"cannot be judged: {exc}")
        judgment = await self.ajudge_pair(pair, gate)
        usage, hits = _cost([judgment])
        if judgment.probability_a is not None:
            return Reward(
                judgment.probability_a, judgment.probability_a, True, judgment.reason, usage, hits, (judgment,)
            )
        if judgment.preference is not None:
            won = 1.0 if judgment.preference == "A" else 0.0
            return Reward(won, won, True, None, usage, hits, (judgment,))
        return self._no_verdict(judgment.reason or "no verdict", (judgment,))

    @staticmethod
    def abstains(ranking: Ranking) -> list[bool]:
        """Per response of a ranked group: whether none of its comparisons (its first copy's, for a copy) reached
        a verdict or a probability (what ``serve-rm``'s ``/v1/rank`` flags per response)."""
        decided = [False] * len(ranking.win_rate)
        for c in ranking.comparisons:
            if c.judgment.preference is not None or c.judgment.probability_a is not None:
                decided[c.first] = decided[c.second] = True
        same_as = ranking.same_as or range(len(decided))
        return [not decided[first] for first in same_as]

    def group(self, prompt: str, responses: list[str]) -> list[Reward]:
        """Each response against the others, judged as one group (:meth:`rank`); a group of one, or of one text,
        has nothing to be compared with."""
        return run_sync(self.agroup(prompt, responses))

    async def agroup(self, prompt: str, responses: list[str], gate: asyncio.Semaphore | None = None) -> list[Reward]:
        self._check_group_size(len(responses))
        if len(responses) < 2:
            return [self._no_verdict("alone in its group")] * len(responses)
        try:
            ranking = await self.arank(prompt, responses, gate)
        except InvalidPair as exc:  # an empty prompt, or two empty responses: nothing to compare
            return [self._no_verdict(f"cannot be judged: {exc}")] * len(responses)
        if not ranking.comparisons:
            return [self._no_verdict("identical to every other response of its group")] * len(responses)
        rewards = []
        for i, abstain in enumerate(self.abstains(ranking)):
            charged = tuple(c.judgment for c in ranking.comparisons if c.first == i)  # each comparison once
            if abstain:
                rewards.append(self._no_verdict("no comparison reached a verdict", charged))
                continue
            usage, hits = _cost(list(charged))
            value = ranking.win_rate[i] if self.group_method == "win_rate" else ranking.strength[i]
            rewards.append(Reward(value, ranking.win_rate[i], True, None, usage, hits, charged))
        return rewards

    def rewards(
        self, prompts: list[str], responses: list[str], references: list[str | None] | None = None
    ) -> list[Reward]:
        """One reward per response: against its reference where it has one, else within its prompt's group."""
        return run_sync(self.arewards(prompts, responses, references))

    async def arewards(
        self, prompts: list[str], responses: list[str], references: list[str | None] | None = None
    ) -> list[Reward]:
        """:meth:`rewards` on the running event loop: every comparison of the batch (against references and
        within groups) shares one limit of ``concurrency`` judgments at once."""
        if len(prompts) != len(responses) or (references is not None and len(references) != len(responses)):
            raise ValueError(
                f"prompts ({len(prompts)}), responses ({len(responses)}) and references "
                f"({len(references) if references is not None else 'none'}) must have the same length"
            )
        references = references or [None] * len(responses)
        groups: dict[str, list[int]] = defaultdict(list)
        pairwise = []
        for i, (prompt, reference) in enumerate(zip(prompts, references)):
            if reference:
                pairwise.append(i)
            else:
                groups[prompt].append(i)
        for members in groups.values():  # refused before any judging starts
            self._check_group_size(len(members))
        gate = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> list[tuple[int, Reward]]:
            return [(i, await self.aagainst_reference(prompts[i], responses[i], references[i], gate))]

        async def group(prompt: str, members: list[int]) -> list[tuple[int, Reward]]:
            return list(zip(members, await self.agroup(prompt, [responses[i] for i in members], gate)))

        tasks = [asyncio.ensure_future(one(i)) for i in pairwise]
        tasks += [asyncio.ensure_future(group(p, members)) for p, members in groups.items()]
        result: list[Reward | None] = [None] * len(responses)
        try:
            for done in await asyncio.gather(*tasks):
                for i, reward in done:
                    result[i] = reward
        finally:  # the first error ends the batch: the judgments still running end with it
            for task in tasks:
                task.cancel()
        return result  # type: ignore[return-value]
