"""A verl reward function: ``custom_reward_function.path=examples/verl_reward.py``, ``.name=compute_score``.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` per rollout; here the
solution is judged against ``ground_truth`` (the reference answer) and the prompt comes from the row's
``extra_info["prompt"]``. The reward is P(solution better than the reference) where the backend gives
verdict probabilities. It returns ``{"score", "abstain"}``: where no verdict stood behind it, ``abstain`` is True
and the score the neutral 0.5 (verl logs ``abstain`` in ``reward_extra_info``). The backend is
``$REFLECTAGENT_BACKEND`` (default: the embedded model).

Run (a demo call): .venv/bin/python examples/verl_reward.py
"""

from reflectagent.rl import verl_compute_score

compute_score = verl_compute_score("genrm-prob")

if __name__ == "__main__":
    print(
        compute_score(
            "demo",
            "Paris is the capital of France.",
            "The capital of France is Berlin.",
            extra_info={"prompt": "What is the capital of France?"},
        )
    )
