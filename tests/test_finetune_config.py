"""One translation of a LoRA job into PEFT's and TRL's configs: every shared flag reaches every trainer.

Nothing trains here: the adapters' and trainers' configs are built and read back.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import HfArgumentParser

from reflectagent.finetune import sft_config
from reflectagent.finetune.dpo import DPOJobConfig, dpo_arguments
from reflectagent.finetune.reward import RewardJobConfig, RewardModelJudge, reward_arguments
from reflectagent.finetune.sft_config import SFTJobConfig, trainer_arguments
from reflectagent.finetune.sft_trainer import sft_arguments

# every value differs from every job's default
SHARED = dict(
    lora_r=4,
    lora_alpha=12,
    lora_dropout=0.2,
    target_modules="gate_proj,up_proj,",
    learning_rate=3e-5,
    epochs=2.0,
    max_steps=7,
    per_device_batch=3,
    gradient_accumulation=5,
    max_length=321,
    bf16=False,
    logging_steps=2,
    seed=17,
)

JOBS = {  # job class, what its trainer builds from a job, PEFT's task type
    "sft": (SFTJobConfig, lambda job: sft_arguments(job, evaluate=True), "CAUSAL_LM"),
    "dpo": (DPOJobConfig, dpo_arguments, "CAUSAL_LM"),
    "reward": (RewardJobConfig, lambda job: reward_arguments(job, evaluate=True), "SEQ_CLS"),
}


@pytest.mark.parametrize("kind", JOBS)
def test_every_shared_flag_reaches_the_adapter_and_the_trainer(kind, tmp_path):
    job_class, build, task_type = JOBS[kind]
    args, lora = build(job_class(output_dir=str(tmp_path / kind), **SHARED))

    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (4, 12, 0.2, task_type)
    assert set(lora.target_modules) == {"gate_proj", "up_proj"}
    assert args.output_dir == str(tmp_path / kind)
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (3e-5, 2.0, 7)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) == (
        3,
        3,
        5,
    )
    assert (args.max_length, args.bf16, args.seed, args.logging_steps) == (321, False, 17, 2)
    assert args.use_cpu == (not torch.cuda.is_available())
    assert args.report_to == [] and args.dataloader_num_workers == 0


@pytest.mark.parametrize("kind", JOBS)
@pytest.mark.parametrize("fast", [True, False])
def test_bf16_is_on_only_where_the_hardware_has_it(kind, fast, tmp_path, monkeypatch):
    monkeypatch.setattr(sft_config, "has_fast_bf16", lambda: fast)
    job_class, build, _ = JOBS[kind]
    args, _ = build(job_class(output_dir=str(tmp_path)))
    assert args.bf16 == (fast or torch.cuda.is_available())


def test_each_trainer_adds_only_its_own_arguments(tmp_path):
    sft, _ = sft_arguments(
        SFTJobConfig(output_dir=str(tmp_path), save_steps=3, eval_steps=6, gradient_checkpointing=True), evaluate=True
    )
    assert sft.completion_only_loss and (sft.save_steps, sft.eval_steps, sft.save_total_limit) == (3, 6, 2)
    assert sft.eval_strategy == "steps" and sft.gradient_checkpointing and not sft.disable_tqdm
    assert sft_arguments(SFTJobConfig(output_dir=str(tmp_path)), evaluate=False)[0].eval_strategy == "no"

    dpo, _ = dpo_arguments(DPOJobConfig(output_dir=str(tmp_path), beta=0.3))
    assert dpo.beta == 0.3 and dpo.save_strategy == "no"

    assert reward_arguments(RewardJobConfig(output_dir=str(tmp_path)), evaluate=True)[0].eval_strategy == "epoch"
    reward, _ = reward_arguments(RewardJobConfig(output_dir=str(tmp_path)), evaluate=False)
    assert reward.eval_strategy == "no" and reward.save_strategy == "no"


def test_a_trainer_cannot_quietly_override_a_shared_field(tmp_path):
    from trl import SFTConfig

    with pytest.raises(TypeError):
        trainer_arguments(SFTJobConfig(output_dir=str(tmp_path)), SFTConfig, seed=1)


def test_defaults_train_what_each_job_always_trained():
    sft, dpo, reward = SFTJobConfig(), DPOJobConfig(), RewardJobConfig()
    qkvo = "q_proj,k_proj,v_proj,o_proj"
    assert (sft.lora_dropout, sft.target_modules, sft.bf16, sft.max_length) == (0.05, qkvo, True, 1024)
    assert (dpo.lora_dropout, dpo.target_modules, dpo.bf16) == (0.0, qkvo, True)
    assert (reward.lora_dropout, reward.target_modules, reward.bf16) == (0.0, "q_proj,v_proj", True)


@pytest.mark.parametrize("job_class", [SFTJobConfig, DPOJobConfig])
def test_the_shared_flags_are_cli_flags_of_every_job(job_class):
    (job,) = HfArgumentParser(job_class).parse_args_into_dataclasses(
        args=["--target_modules", "q_proj", "--lora_dropout", "0.1", "--no_bf16", "--max_length", "512"]
    )
    assert (job.target_modules, job.lora_dropout, job.bf16, job.max_length) == ("q_proj", 0.1, False, 512)


class WordTokenizer:
    """One token per word; remembers the length it was asked to cut to."""

    def apply_chat_template(self, messages, tokenize):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, return_tensors, truncation, max_length):
        self.max_length, words = max_length, len(text.split())
        return {"input_ids": torch.ones(1, min(words, max_length) if truncation else words, dtype=torch.long)}


def test_reward_judge_keeps_and_truncates_at_its_max_length(tmp_path):
    assert RewardModelJudge("adapter", "embedded").options["max_length"] == 1024
    judge = RewardModelJudge("adapter", "embedded", max_length=5)
    assert RewardModelJudge.load(judge.save(tmp_path / "rm.json")).options == {
        "adapter": "adapter",
        "base_model": "embedded",
        "max_length": 5,
    }

    # no weights: the "reward" is the number of tokens the model was given
    judge._tokenizer = WordTokenizer()
    judge._model = lambda input_ids: SimpleNamespace(logits=torch.tensor([[float(input_ids.shape[1])]]))
    assert judge.reward("one two three", "four five six seven") == 5.0 and judge._tokenizer.max_length == 5
