"""STaR-DPO: prefer the right analysis over the wrong one of the same prompt, after SFT.

The SFT adapter is merged into the base weights in memory; a fresh LoRA adapter is then
trained with TRL's DPOTrainer, whose reference model is that merged SFT model (the PEFT
model with its new adapter switched off), as STaR-DPO prescribes. The new adapter only makes
sense on top of the SFT weights, so the job also saves ``merged/``: base + SFT + DPO as one
full model folder, which vLLM serves as a plain model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reflectagent.finetune.run_card import RunCard, losses
from reflectagent.finetune.sft_config import LoRAJobConfig, lora_config, trainer_arguments

if TYPE_CHECKING:
    from peft import LoraConfig
    from trl import DPOConfig


@dataclass
class DPOJobConfig(LoRAJobConfig):
    output_dir: str = field(default="runs/dpo", metadata={"help": "the DPO adapter, merged model, run card and curve"})
    lora_dropout: float = field(default=0.0, metadata={"help": "PEFT's default of none, as DPO has always trained"})
    learning_rate: float = field(default=5e-5)
    data: str = field(
        default="runs/data/dpo", metadata={"help": "a DatasetDict folder with prompt/chosen/rejected rows"}
    )
    sft_adapter: str | None = field(
        default=None, metadata={"help": "the SFT adapter to start from (and to be the reference)"}
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO temperature: how far from the reference the policy may move"}
    )


def dpo_arguments(config: DPOJobConfig) -> tuple[DPOConfig, LoraConfig]:
    """TRL's DPOConfig and the fresh LoRA adapter for a DPO job (no checkpoints: the job saves its adapter and merged model at the end)."""
    from trl import DPOConfig

    args = trainer_arguments(config, DPOConfig, beta=config.beta, save_strategy="no")
    return args, lora_config(config, "CAUSAL_LM")


def train_dpo(config: DPOJobConfig) -> Path:
    """Train the DPO adapter; return the merged model folder (servable as a plain model)."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from reflectagent.finetune.sft_trainer import drop_too_long, plot_curve, start_run

    base, out, tokenizer = start_run(config)
    train, too_long = drop_too_long(
        datasets.load_from_disk(config.data)["train"], tokenizer, config.max_length, targets=("chosen", "rejected")
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if config.sft_adapter:
        model = PeftModel.from_pretrained(model, config.sft_adapter).merge_and_unload()
    args, peft_config = dpo_arguments(config)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    started = time.perf_counter()
    result = trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    merged = out / "merged"
    trainer.model.merge_and_unload().to(torch.bfloat16).save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    history = trainer.state.log_history
    plot_curve(history, out / "training_curve.png")
    first_loss, final_loss, _ = losses(history)
    RunCard(
        config=asdict(config),
        base_model=str(base),
        steps=trainer.state.global_step,
        seconds=time.perf_counter() - started,
        train_loss=result.training_loss,
        first_loss=first_loss,
        final_loss=final_loss,
        train_rows=len(train),
        dropped_too_long=too_long,
        bf16=args.bf16,
        reward_accuracy=next(
            (e.get("rewards/accuracies") for e in reversed(history) if "rewards/accuracies" in e), None
        ),
    ).write(out)
    return merged
