"""STaR-DPO: prefer the right analysis over the wrong one of the same prompt, after SFT.

The SFT adapter is merged into the base weights in memory; a fresh LoRA adapter is then
trained with TRL's DPOTrainer, whose reference model is that merged SFT model (the PEFT
model with its new adapter switched off), as STaR-DPO prescribes. The new adapter only makes
sense on top of the SFT weights, so the job also saves ``merged/``: base + SFT + DPO as one
full model folder, which vLLM serves as a plain model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reflectagent.finetune.sft_config import LoRAJobConfig


@dataclass
class DPOJobConfig(LoRAJobConfig):
    output_dir: str = field(default="runs/dpo", metadata={"help": "the DPO adapter, merged model, run card and curve"})
    learning_rate: float = field(default=5e-5)
    data: str = field(default="runs/data/dpo", metadata={"help": "a DatasetDict folder with prompt/chosen/rejected rows"})
    sft_adapter: str | None = field(default=None, metadata={"help": "the SFT adapter to start from (and to be the reference)"})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: how far from the reference the policy may move"})


def train_dpo(config: DPOJobConfig) -> Path:
    """Train the DPO adapter; return the merged model folder (servable as a plain model)."""
    import datasets
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from reflectagent.finetune.sft_trainer import drop_too_long, has_fast_bf16, plot_curve, start_run

    base, out, tokenizer = start_run(config)
    train, too_long = drop_too_long(datasets.load_from_disk(config.data)["train"], tokenizer, config.max_length,
                                    targets=("chosen", "rejected"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if config.sft_adapter:
        model = PeftModel.from_pretrained(model, config.sft_adapter).merge_and_unload()
    args = DPOConfig(
        output_dir=str(out), beta=config.beta, learning_rate=config.learning_rate, num_train_epochs=config.epochs,
        max_steps=config.max_steps, per_device_train_batch_size=config.per_device_batch,
        gradient_accumulation_steps=config.gradient_accumulation, max_length=config.max_length,
        bf16=torch.cuda.is_available() or has_fast_bf16(), use_cpu=not torch.cuda.is_available(), seed=config.seed,
        logging_steps=config.logging_steps, save_strategy="no", report_to=[], dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    started = time.perf_counter()
    result = trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    merged = out / "merged"
    trainer.model.merge_and_unload().to(torch.bfloat16).save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    history = trainer.state.log_history
    plot_curve(history, out / "training_curve.png")
    losses = [e["loss"] for e in history if "loss" in e]
    (out / "run_card.json").write_text(json.dumps({
        "config": asdict(config), "base_model": str(base), "train_rows": len(train), "dropped_too_long": too_long,
        "steps": trainer.state.global_step, "seconds": time.perf_counter() - started, "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "reward_accuracy": next((e.get("rewards/accuracies") for e in reversed(history) if "rewards/accuracies" in e), None),
    }, indent=2))
    return merged
