"""Ranking N responses to one prompt with any pairwise judge (best-of-N, GRPO-style group rewards).

``round_robin`` judges all N(N-1)/2 pairs and scores each response by win rate and by a
Bradley-Terry strength; ``tournament`` is single elimination, N-1 comparisons, enough to pick
the best. A comparison with no verdict scores the judgment's order-averaged P(A) when the
backend gives one, else a draw (0.5 each); in a tournament such a draw is settled by P(A)
again and, failing that, by a seeded coin, so results are reproducible.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass
from typing import Literal

from reflectagent.calling.concurrency import run_sync
from reflectagent.judging.base import Judge
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment, Usage

Method = Literal["round_robin", "tournament"]


@dataclass(frozen=True)
class Comparison:
    first: int  # shown as response A
    second: int  # shown as response B
    judgment: Judgment

    @property
    def score(self) -> float:
        """The first response's share of the win: 1, 0, or a soft value when there is no verdict."""
        if self.judgment.preference is not None:
            return 1.0 if self.judgment.preference == "A" else 0.0
        return self.judgment.probability_a if self.judgment.probability_a is not None else 0.5


@dataclass(frozen=True)
class Ranking:
    order: tuple[int, ...]  # response indices, best first
    win_rate: tuple[float, ...]  # per response, over the comparisons it took part in
    strength: tuple[float, ...]  # per response: Bradley-Terry log-strength (mean 0)
    comparisons: tuple[Comparison, ...]
    method: str
    # per response, the response whose scores it holds: its first identical copy, or itself. Empty where every
    # response was judged (``rank``); set where copies were judged once (``reflectagent.rl.groups``)
    same_as: tuple[int, ...] = ()

    @property
    def best(self) -> int:
        return self.order[0]

    @property
    def usage(self) -> Usage:
        return sum((c.judgment.usage for c in self.comparisons), Usage())


def bradley_terry(
    n: int, comparisons: list[tuple[int, int, float]], prior: float = 0.1, iterations: int = 500
) -> list[float]:
    """Log-strengths by Hunter's MM algorithm; soft scores allowed, ``prior`` pseudo-draws keep them finite."""
    wins = [[prior / 2 if i != j else 0.0 for j in range(n)] for i in range(n)]
    for i, j, score in comparisons:
        wins[i][j] += score
        wins[j][i] += 1.0 - score
    strength = [1.0] * n
    for _ in range(iterations):
        updated = []
        for i in range(n):
            denominator = sum((wins[i][j] + wins[j][i]) / (strength[i] + strength[j]) for j in range(n) if j != i)
            updated.append(sum(wins[i]) / denominator if denominator else strength[i])
        mean_log = sum(math.log(s) for s in updated) / n
        updated = [s / math.exp(mean_log) for s in updated]
        done = max(abs(a - b) for a, b in zip(updated, strength)) < 1e-10
        strength = updated
        if done:
            break
    return [math.log(s) for s in strength]


async def _judge_matches(
    judge: Judge, prompt: str, matches: list[tuple[int, int]], responses: list[str], gate: asyncio.Semaphore
) -> list[Comparison]:
    async def one(i: int, j: int) -> Judgment:
        async with gate:
            return await judge.ajudge(Pair(prompt=prompt, response_a=responses[i], response_b=responses[j]))

    tasks = [asyncio.ensure_future(one(i, j)) for i, j in matches]
    try:
        judgments = await asyncio.gather(*tasks)
    finally:  # the first error ends the ranking: the comparisons still running end with it
        for task in tasks:
            task.cancel()
    return [Comparison(i, j, judgment) for (i, j), judgment in zip(matches, judgments)]


def _scores(n: int, comparisons: list[Comparison]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    won, played = [0.0] * n, [0] * n
    for c in comparisons:
        won[c.first] += c.score
        won[c.second] += 1 - c.score
        played[c.first] += 1
        played[c.second] += 1
    win_rate = tuple(w / p if p else 0.0 for w, p in zip(won, played))
    strength = tuple(bradley_terry(n, [(c.first, c.second, c.score) for c in comparisons]))
    return win_rate, strength


def rank(
    judge: Judge, prompt: str, responses: list[str], method: Method = "round_robin", concurrency: int = 8, seed: int = 0
) -> Ranking:
    """Rank ``responses`` to ``prompt`` with ``judge`` (each comparison uses the judge's own order handling)."""
    return run_sync(arank(judge, prompt, responses, method, concurrency, seed))


async def arank(
    judge: Judge,
    prompt: str,
    responses: list[str],
    method: Method = "round_robin",
    concurrency: int = 8,
    seed: int = 0,
    *,
    gate: asyncio.Semaphore | None = None,
) -> Ranking:
    """:func:`rank`, async. ``gate`` (instead of ``concurrency``) shares one limit with other work, such as
    the other groups of a batch of rewards."""
    gate = gate or asyncio.Semaphore(concurrency)
    n = len(responses)
    if n < 2:
        raise ValueError("ranking needs at least two responses")
    if method == "round_robin":
        comparisons = await _judge_matches(
            judge, prompt, [(i, j) for i in range(n) for j in range(i + 1, n)], responses, gate
        )
        win_rate, strength = _scores(n, comparisons)
        order = sorted(range(n), key=lambda i: (-strength[i], -win_rate[i], i))
        return Ranking(tuple(order), win_rate, strength, tuple(comparisons), method)
    if method != "tournament":
        raise ValueError(f"method must be 'round_robin' or 'tournament', not {method!r}")
    coin = random.Random(seed)
    alive, eliminated, comparisons = list(range(n)), [], []
    while len(alive) > 1:
        matches = [(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)]
        played = await _judge_matches(judge, prompt, matches, responses, gate)
        comparisons += played
        winners, losers = [], []
        for c in played:
            first_wins = c.score > 0.5 or (c.score == 0.5 and coin.random() < 0.5)
            winners.append(c.first if first_wins else c.second)
            losers.append(c.second if first_wins else c.first)
        eliminated.append(losers)
        alive = winners + ([alive[-1]] if len(alive) % 2 else [])  # an odd one out gets a bye
    win_rate, strength = _scores(n, comparisons)
    order = alive + [
        i for round_losers in reversed(eliminated) for i in sorted(round_losers, key=lambda i: -win_rate[i])
    ]
    return Ranking(tuple(order), win_rate, strength, tuple(comparisons), method)


def best_of_n(judge: Judge, prompt: str, responses: list[str], method: Method = "tournament", **kwargs) -> int:
    """The index of the best response (a tournament by default: N-1 comparisons)."""
    return rank(judge, prompt, responses, method=method, **kwargs).best
