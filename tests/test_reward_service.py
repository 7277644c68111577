"""The reward service on loopback and TRL's GRPOTrainer, both against the real embedded vLLM server."""

from __future__ import annotations

import math

import dspy
import httpx
import pytest

from conftest import running_service
from reflectagent.config import BackendConfig, Settings
from reflectagent.programs import named_program
from reflectagent.programs.ranking import rank
from reflectagent.rl import Rewarder, trl_reward

pytestmark = pytest.mark.server
SETTINGS = Settings(backends={"embedded": BackendConfig(model="embedded", context_chars=4000)})


def test_every_route_answers_what_the_same_judgments_give_in_python(server, cache, sample_pairs):
    rewarder = Rewarder("genrm-prob", "embedded", SETTINGS)
    pairs = sample_pairs[:3]
    with running_service(rewarder) as url:
        judged = httpx.post(f"{url}/v1/judge", json=pairs[0].inputs(), timeout=600).json()
        labelled = httpx.post(
            f"{url}/get_reward",
            timeout=600,
            json={
                "query": [p.prompt + p.response_a for p in pairs],
                "prompts": [p.prompt for p in pairs],
                "labels": [p.response_b for p in pairs],
            },
        ).json()
        group = [pairs[0].response_a, pairs[0].response_b, pairs[1].response_a]
        grouped = httpx.post(
            f"{url}/get_reward",
            timeout=600,
            json={"query": [pairs[0].prompt + r for r in group], "prompts": [pairs[0].prompt] * 3},
        ).json()
        ranked = httpx.post(f"{url}/v1/rank", json={"prompt": pairs[0].prompt, "responses": group}, timeout=600).json()
        health = httpx.get(f"{url}/health").json()
        metrics = httpx.get(f"{url}/metrics").text

    with dspy.context(lm=rewarder.lm):  # the same steps, now from the cache
        local = named_program("genrm-prob").judge(pairs[0])
        local_rank = rank(named_program("genrm-prob"), pairs[0].prompt, group)
    assert judged["preference"] == local.preference and judged["probability_a"] == pytest.approx(local.probability_a)
    assert len(judged["analyses"]) == 2 and judged["cost"]["lm_calls"] + judged["cost"]["cache_hits"] >= 2
    expected = rewarder.rewards([p.prompt for p in pairs], [p.response_a for p in pairs], [p.response_b for p in pairs])
    assert labelled["rewards"] == pytest.approx([r.reward for r in expected])
    assert all(0.0 <= s <= 1.0 for s in labelled["scores"]) and labelled["extra_logs"]["abstain"] == [0.0, 0.0, 0.0]
    assert labelled["rewards"][0] == pytest.approx(local.probability_a)  # P(response better than the reference)
    assert grouped["rewards"] == pytest.approx(list(local_rank.win_rate))
    assert ranked["scores"] == pytest.approx(list(local_rank.win_rate)) and sorted(ranked["ranks"]) == [1, 2, 3]
    assert judged["abstain"] == (local.preference is None and local.probability_a is None)
    assert ranked["abstain"] == Rewarder.abstains(local_rank)
    assert health["status"] == "ok" and health["in_flight"] == 0
    calls = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("reflectagent_lm_calls_total"))
    )
    assert calls > 0 and 'reflectagent_request_seconds_count{route="/get_reward"} 2.0' in metrics
    gauges = {
        line.split("{")[0].removeprefix("reflectagent_judge_"): float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("reflectagent_judge_") and 'judge="GenRM"' in line
    }
    assert gauges["window_judgments"] == 1 + 3 + 3 + 3  # the pair, three against references, two groups of three
    assert 0.0 <= gauges["order_flip_rate"] <= 1.0 and 0.0 <= gauges["mean_margin"] <= 0.5  # genrm-prob saw both orders


def test_a_group_is_judged_once_per_distinct_pair_and_a_reordered_group_comes_from_the_cache(
    server, cache, sample_pairs
):
    """One order per judgment (``genrm``: one LM call each), so the order a pair is shown in decides what is cached."""
    pair = sample_pairs[0]
    responses = [pair.response_a, pair.response_b, "I do not know.", pair.response_a]  # the last is a copy
    with running_service(Rewarder("genrm", "embedded", SETTINGS)) as url:
        first = httpx.post(f"{url}/v1/rank", json={"prompt": pair.prompt, "responses": responses}, timeout=600).json()
        calls = lm_calls(httpx.get(f"{url}/metrics").text)
        again = httpx.post(
            f"{url}/v1/rank", json={"prompt": pair.prompt, "responses": responses[::-1]}, timeout=600
        ).json()
        after = lm_calls(httpx.get(f"{url}/metrics").text)
    assert first["comparisons"] == 3 and calls == 3  # naive pairwise: 6 judgments, 5 of them LM calls
    assert first["scores"][0] == first["scores"][3] and after == calls  # the reordered group: every step from the cache
    assert again["scores"] == pytest.approx(first["scores"][::-1])


def lm_calls(metrics: str) -> float:
    return float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("reflectagent_lm_calls_total"))
    )


@pytest.mark.torch
def test_grpo_trains_two_steps_with_a_reflectagent_reward(server, cache, model_dir, tmp_path):
    """TRL's GRPOTrainer on CPU: SmolLM2 as the policy, a reflectagent judge (on the embedded server) as the
    reward, group-relative over each prompt's completions; the trainer logs our reward at every step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    reward = trl_reward("genrm-prob", "embedded", settings=SETTINGS)
    prompts = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": q}]}
            for q in ("What is the capital of France?", "Name a prime number.")
        ]
    )
    config = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[reward], args=config, train_dataset=prompts)
    trainer.train()
    logged = [row for row in trainer.state.log_history if f"rewards/{reward.__name__}/mean" in row]
    assert len(logged) == 2
    assert all(math.isfinite(row[f"rewards/{reward.__name__}/mean"]) for row in logged)
