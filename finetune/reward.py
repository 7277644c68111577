"""The discriminative baseline: a Bradley-Terry reward model (the base model with a scalar head).

GenRM's paper measures generative judges against exactly this: the same base model, a
scalar head, a pairwise loss, the same train pairs. TRL's RewardTrainer trains it (LoRA on
the body, the head trained in full); ``RewardModelJudge`` puts it behind the ``Judge``
interface, so the same eval scores it. It writes no analyses and is order-invariant by
construction: its consistency is total, its accuracy is the point.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reflectagent.finetune.run_card import RunCard, losses
from reflectagent.finetune.sft_config import LoRAJobConfig, lora_config, trainer_arguments
from reflectagent.judging.base import Judge
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment

if TYPE_CHECKING:
    from peft import LoraConfig
    from trl import RewardConfig


@dataclass
class RewardJobConfig(LoRAJobConfig):
    output_dir: str = field(
        default="runs/reward", metadata={"help": "the adapter (with the scalar head) and the run card"}
    )
    # PEFT's own choices for Llama and Qwen, which the baseline has always trained with
    lora_dropout: float = field(default=0.0)
    target_modules: str = field(default="q_proj,v_proj", metadata={"help": "comma-separated module names"})


def preference_rows(pairs: list[Pair]) -> list[dict]:
    """Conversational chosen/rejected rows (pairs labelled A or B only)."""
    rows = []
    for pair in pairs:
        if pair.label not in ("A", "B"):
            continue
        good, bad = (pair.response_a, pair.response_b) if pair.label == "A" else (pair.response_b, pair.response_a)
        rows.append(
            {
                "prompt": [{"role": "user", "content": pair.prompt}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return rows


def reward_arguments(config: RewardJobConfig, evaluate: bool) -> tuple[RewardConfig, LoraConfig]:
    """TRL's RewardConfig and the LoRA adapter (with the scalar head, trained in full); ``evaluate``: there are dev pairs."""
    from trl import RewardConfig

    args = trainer_arguments(config, RewardConfig, save_strategy="no", eval_strategy="epoch" if evaluate else "no")
    return args, lora_config(config, "SEQ_CLS")


def train_reward(config: RewardJobConfig, train: list[Pair], dev: list[Pair] | None = None) -> Path:
    """Train the Bradley-Terry baseline; return its adapter folder (with the scalar head)."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer

    from reflectagent.finetune.sft_trainer import plot_curve, start_run

    base, out, tokenizer = start_run(config)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    dev_rows = preference_rows(dev or [])
    args, peft_config = reward_arguments(config, evaluate=bool(dev_rows))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(preference_rows(train)),
        eval_dataset=datasets.Dataset.from_list(dev_rows) if dev_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    started = time.perf_counter()
    result = trainer.train()
    adapter = out / "adapter"
    trainer.model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    plot_curve(trainer.state.log_history, out / "training_curve.png")
    first_loss, final_loss, eval_loss = losses(trainer.state.log_history)
    RunCard(
        config=asdict(config),
        base_model=str(base),
        steps=trainer.state.global_step,
        seconds=time.perf_counter() - started,
        train_loss=result.training_loss,
        first_loss=first_loss,
        final_loss=final_loss,
        eval_loss=eval_loss,
        train_rows=len(preference_rows(train)),
        bf16=args.bf16,
    ).write(out)
    return adapter


class RewardModelJudge(Judge):
    """A scalar reward model as a pairwise judge: the higher reward wins; P(A) = sigmoid(r_A - r_B).

    ``max_length`` should be the training job's: TRL left longer pairs out of training, so the
    model never learned a reward past it; longer inputs are cut to it.
    """

    def __init__(self, adapter: str, base_model: str = "embedded", max_length: int = 1024):
        super().__init__(adapter=str(adapter), base_model=base_model, max_length=max_length)
        self._model = None
        self._loading = threading.Lock()  # the eval judges pairs from a thread pool; load the model once

    def _load(self):
        with self._loading:
            if self._model is not None:
                return self._model
            import torch
            from peft import PeftModel
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from reflectagent.serving.models import prepare_model

            base = prepare_model(self.options["base_model"])
            self._tokenizer = AutoTokenizer.from_pretrained(self.options["adapter"])
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
            model.config.pad_token_id = self._tokenizer.pad_token_id
            self._model = PeftModel.from_pretrained(model, self.options["adapter"]).eval()
            return self._model

    def reward(self, prompt: str, response: str) -> float:
        import torch

        model = self._load()
        text = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        batch = self._tokenizer(text, return_tensors="pt", truncation=True, max_length=self.options["max_length"])
        with torch.no_grad():
            return float(model(**batch).logits[0, 0])

    def decide(self, pair: Pair) -> Judgment:
        margin = self.reward(pair.prompt, pair.response_a) - self.reward(pair.prompt, pair.response_b)
        probability_a = 1 / (1 + math.exp(-margin))
        if margin == 0:
            return Judgment(preference=None, reason="equal rewards", probability_a=0.5)
        return Judgment(preference="A" if margin > 0 else "B", probability_a=probability_a)
