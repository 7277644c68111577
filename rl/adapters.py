"""The function shapes TRL, verl and OpenRLHF call, each backed by a :class:`Rewarder`.

A response no verdict stood behind (:attr:`Reward.abstain`) is an explicit abstain in every shape, never a
silent 0; what each trainer then does with it differs, and is said here:

- TRL ``GRPOTrainer(reward_funcs=[trl_reward(...)])``: called with ``prompts``, ``completions`` and every
  dataset column as keyword arguments; returns one float per completion, and ``None`` for an abstain.
  TRL (1.x) turns ``None`` into NaN: it is left out of its group's mean and spread (nan-aware), a completion
  that every reward function abstained on gets advantage 0 (no gradient from it), and the logged reward
  ignores it; with several reward functions, the others' rewards still count. A ``reference`` column (name it
  with ``reference_column``) makes each reward pairwise against it; without one, completions of the same
  prompt are judged as a group. ``trl_reward(..., asynchronous=True)`` gives an ``async def`` (TRL gathers
  those concurrently).
- verl ``custom_reward_function``: ``compute_score(data_source, solution_str, ground_truth, extra_info)``
  judges the solution against ``ground_truth``; the prompt comes from ``extra_info["prompt"]``. verl needs a
  number for every row: it returns ``{"score", "abstain"}``, the score of an abstain being the neutral
  ``no_verdict_reward``. verl's reward managers put ``score`` in the reward tensor and every other key in
  ``reward_extra_info`` (logged per batch), so an abstain trains as a neutral reward and is counted; a
  custom reward manager can read ``abstain`` to mask it.
- OpenRLHF ``--remote_rm_url reward_func.py``: ``reward_func(queries, prompts, labels)``, where each
  query is its prompt followed by the response; returns ``rewards``, ``scores`` and ``extra_logs`` with
  ``abstain`` (1.0 per abstain). OpenRLHF trains on ``rewards`` as they are (an abstain at the neutral
  ``no_verdict_reward``) and logs the batch mean of each ``extra_logs`` entry, so the abstain rate is in its
  logs; it has no per-sample mask for a remote reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflectagent.errors import ReflectAgentError
from reflectagent.rl.rewards import Rewarder


class RewardInputError(ReflectAgentError, ValueError):
    """A trainer's call that cannot be turned into pairs to judge, with what to fix."""


def as_text(value: Any) -> str:
    """A TRL prompt or completion as text: a string as it is, a conversation as ``role: content`` lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        if len(value) == 1:
            return str(value[0]["content"])
        return "\n\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in value)
    raise RewardInputError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def trl_reward(
    judge="genrm-prob",
    backend: str | None = None,
    *,
    reference_column: str | None = None,
    asynchronous: bool = False,
    rewarder: Rewarder | None = None,
    **options,
):
    """A TRL reward function (sync, or ``async def`` with ``asynchronous=True``) named after its judge: a float
    per completion, ``None`` where it abstains (TRL masks it)."""
    if rewarder is not None:
        name = rewarder.name
    elif isinstance(judge, str):
        name = Path(judge).stem if judge.endswith(".json") else judge  # a saved program: its file's name
    else:
        name = type(judge).__name__
    rewarder = rewarder or Rewarder(judge, backend, **options)

    def inputs(prompts, completions, kwargs):
        references = None
        if reference_column is not None:
            if reference_column not in kwargs:
                raise RewardInputError(f"the dataset has no {reference_column!r} column (columns: {sorted(kwargs)})")
            references = [None if r is None else as_text(r) for r in kwargs[reference_column]]
        return [as_text(p) for p in prompts], [as_text(c) for c in completions], references

    def floats(rewards):
        return [None if r.abstain else r.reward for r in rewards]

    if asynchronous:

        async def reward(prompts, completions, **kwargs):
            return floats(await rewarder.arewards(*inputs(prompts, completions, kwargs)))
    else:

        def reward(prompts, completions, **kwargs):
            return floats(rewarder.rewards(*inputs(prompts, completions, kwargs)))

    reward.__name__ = f"reflectagent_{name}".replace("-", "_")  # TRL logs each reward under its function's name
    return reward


def verl_compute_score(judge="genrm-prob", backend: str | None = None, *, rewarder: Rewarder | None = None, **options):
    """A verl ``compute_score``: the solution against ``ground_truth``, the prompt from ``extra_info['prompt']``;
    ``{"score", "abstain"}`` (an abstain's score is the neutral ``no_verdict_reward``)."""
    rewarder = rewarder or Rewarder(judge, backend, **options)

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **_):
        prompt = (extra_info or {}).get("prompt")
        if not prompt:
            raise RewardInputError("verl's extra_info has no 'prompt': put the prompt text in each row's extra_info")
        if not ground_truth:
            raise RewardInputError(
                f"no ground_truth for a {data_source} row: a pairwise judge needs a reference answer"
            )
        result = rewarder.against_reference(as_text(prompt), solution_str, as_text(ground_truth))
        return {"score": result.reward, "abstain": result.abstain}

    return compute_score


def split_query(query: str, prompt: str) -> str:
    """OpenRLHF's query is the prompt followed by the response: the response is what follows."""
    if not query.startswith(prompt):
        raise RewardInputError("a query does not start with its prompt: send query = prompt + response")
    return query[len(prompt) :]


def openrlhf_batch(queries, prompts, labels=None) -> tuple[list[str], list[str], list[str] | None]:
    """OpenRLHF's batch (queries = prompt + response, their prompts, optional reference labels) as the
    prompts, responses and references a :class:`Rewarder` takes; what is wrong with it, said once for the
    in-process ``reward_func`` and the ``/get_reward`` route."""
    if len(queries) != len(prompts) or (labels and len(labels) != len(queries)):
        raise RewardInputError(
            f"query ({len(queries)}), prompts ({len(prompts)}) and labels ({len(labels or [])}) "
            "must have the same length"
        )
    return list(prompts), [split_query(q, p) for q, p in zip(queries, prompts)], list(labels) if labels else None


def openrlhf_reward_func(
    judge="genrm-prob", backend: str | None = None, *, rewarder: Rewarder | None = None, **options
):
    """An OpenRLHF ``reward_func``: labels (reference answers) make rewards pairwise; without them, group-relative.
    ``extra_logs["abstain"]`` is 1.0 for each reward no verdict stood behind (its reward: ``no_verdict_reward``)."""
    rewarder = rewarder or Rewarder(judge, backend, **options)

    def reward_func(queries, prompts, labels=None, **_):
        results = rewarder.rewards(*openrlhf_batch(queries, prompts, labels))
        import torch

        return {
            "rewards": torch.tensor([r.reward for r in results]),
            "scores": torch.tensor([r.score for r in results]),
            "extra_logs": {"abstain": torch.tensor([1.0 if r.abstain else 0.0 for r in results])},
        }

    return reward_func
