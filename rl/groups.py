"""The N responses to one prompt judged together, in as few judgments as their ranking needs.

Why: a GRPO step samples N completions per prompt, and judging every two of them costs N(N-1)/2 judgments.
At low temperature many completions are the same text, and a prompt comes back in later steps with
completions met before. So a group is judged as one:

- **identical completions are judged once**: each copy gets its first copy's scores. A response judged
  against its own copy says nothing, and a copy's draw would pull its win rate toward 0.5;
- **pairs are cached**: the two responses of a pair are always shown in one order (the order of their
  texts' hashes), and a tournament's bracket is drawn in that order, so the same completions in any order,
  in any later group, are the same steps: the judgment cache answers them;
- **round robin or tournament by size**: up to ``round_robin_up_to`` distinct responses, every two are
  judged (win rates and Bradley-Terry strengths from all pairs); above it, single elimination, N - 1
  judgments, which keeps a large group's cost linear and still ranks the best first.

:func:`ajudge_group` returns a :class:`~reflectagent.programs.ranking.Ranking` over all N responses
(copies included, ``same_as`` saying whose scores each holds); :func:`judgments_needed` counts, before
any judging, what it will take.
"""

from __future__ import annotations

import asyncio
import hashlib

from reflectagent.judging.base import Judge
from reflectagent.programs.ranking import Comparison, Method, Ranking, arank

ROUND_ROBIN_UP_TO = 8  # TRL's default num_generations: 28 judgments; 16 distinct would be 120 (a tournament: 15)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def distinct(responses: list[str]) -> tuple[list[int], tuple[int, ...]]:
    """The first copy of each distinct response, in canonical (hash) order, and for every response the index
    of its first copy (itself where it is one)."""
    first: dict[str, int] = {}
    same_as = tuple(first.setdefault(text, i) for i, text in enumerate(responses))
    return sorted(first.values(), key=lambda i: (_digest(responses[i]), i)), same_as


def method_for(n_distinct: int, round_robin_up_to: int = ROUND_ROBIN_UP_TO) -> Method:
    """Round robin for a group of up to ``round_robin_up_to`` distinct responses, else a tournament."""
    return "round_robin" if n_distinct <= round_robin_up_to else "tournament"


def judgments_for(n_distinct: int, round_robin_up_to: int = ROUND_ROBIN_UP_TO) -> int:
    """What judging ``n_distinct`` distinct responses together takes."""
    if n_distinct < 2:
        return 0
    if method_for(n_distinct, round_robin_up_to) == "round_robin":
        return n_distinct * (n_distinct - 1) // 2
    return n_distinct - 1


def judgments_needed(responses: list[str], round_robin_up_to: int = ROUND_ROBIN_UP_TO) -> int:
    """What :func:`ajudge_group` will take for ``responses``, counted before any judging."""
    return judgments_for(len(set(responses)), round_robin_up_to)


async def ajudge_group(
    judge: Judge,
    prompt: str,
    responses: list[str],
    *,
    round_robin_up_to: int = ROUND_ROBIN_UP_TO,
    concurrency: int = 8,
    gate: asyncio.Semaphore | None = None,
) -> Ranking:
    """Rank ``responses`` to ``prompt`` as one group (see the module). A group whose responses are all one text
    has nothing to compare: no comparison, every response abstains (:meth:`Rewarder.abstains`)."""
    n = len(responses)
    if n < 2:
        raise ValueError("a group needs at least two responses")
    order, same_as = distinct(responses)
    if len(order) < 2:
        return Ranking(tuple(range(n)), (0.5,) * n, (0.0,) * n, (), "identical", same_as)
    shown = [responses[i] for i in order]
    ranked = await arank(judge, prompt, shown, method_for(len(order), round_robin_up_to), concurrency, gate=gate)
    place = {index: k for k, index in enumerate(order)}  # original first copy -> its index in ``shown``
    win_rate = tuple(ranked.win_rate[place[same_as[i]]] for i in range(n))
    strength = tuple(ranked.strength[place[same_as[i]]] for i in range(n))
    position = {order[k]: p for p, k in enumerate(ranked.order)}
    ranking_order = tuple(sorted(range(n), key=lambda i: (position[same_as[i]], i)))
    comparisons = tuple(Comparison(order[c.first], order[c.second], c.judgment) for c in ranked.comparisons)
    return Ranking(ranking_order, win_rate, strength, comparisons, ranked.method, same_as)
