"""The Bradley-Terry baseline: a tiny real run on the embedded model, then judged like any program."""

import json

import pytest

from reflectagent.finetune.reward import RewardJobConfig, RewardModelJudge, train_reward

pytestmark = pytest.mark.torch


def test_tiny_reward_model_trains_and_judges_order_invariantly(model_dir, sample_pairs, tmp_path):
    train = sample_pairs[:8]
    config = RewardJobConfig(
        output_dir=str(tmp_path / "rm"),
        max_steps=8,
        per_device_batch=4,
        gradient_accumulation=1,
        learning_rate=1e-3,
        max_length=512,
        logging_steps=1,
        lora_r=8,
        lora_alpha=16,
        threads=2,
    )
    adapter = train_reward(config, train)
    card = json.loads((tmp_path / "rm" / "run_card.json").read_text())
    assert card["steps"] == 8 and card["train_rows"] == 8  # pairs, for the reward model (RunCard)
    assert card["final_loss"] < card["first_loss"], card
    judge = RewardModelJudge(str(adapter), max_length=config.max_length)
    right = 0
    for pair in train:
        straight, swapped = judge.judge(pair), judge.judge(pair.swapped())
        assert straight.preference is not None and {straight.preference, swapped.preference} == {"A", "B"}
        assert abs(straight.probability_a + swapped.probability_a - 1) < 1e-6 and straight.lm_calls == 0
        right += straight.preference == pair.label
    assert right >= 6  # it has fitted its own 8 training pairs
