"""Configuration of a LoRA fine-tuning run: a documented dataclass that is also the CLI's flags.

Defaults are sized for the embedded SmolLM2-135M on 2 CPU cores (ENVIRONMENT.md: bf16
weights ~360 tokens/s, fp32 weights with bf16 autocast ~430 tokens/s; micro-batches of 2
with accumulation keep memory near 4.5 GB). For a Qwen3 ReflectRM on a GPU, change
``base_model``, ``max_length`` (4096+), ``per_device_batch`` and ``learning_rate`` (1e-4),
and launch with ``accelerate launch`` for several GPUs: nothing in the code changes.

:func:`lora_config` and :func:`trainer_arguments` are the one translation of a job into
PEFT's and TRL's own configs, so SFT, STaR-DPO and the Bradley-Terry baseline cannot drift
apart on what a shared flag means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import TrainingArguments

Arguments = TypeVar("Arguments", bound="TrainingArguments")


@dataclass
class LoRAJobConfig:
    """What every LoRA training job here shares (SFT, STaR-DPO, the Bradley-Terry baseline)."""

    base_model: str = field(default="embedded", metadata={"help": "'embedded', a model folder or a hub id"})
    output_dir: str = field(
        default="runs/job", metadata={"help": "checkpoints, the adapter, the run card and the curve"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling"})
    lora_dropout: float = field(default=0.05)
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "comma-separated module names"}
    )
    learning_rate: float = field(default=2e-4)
    epochs: float = field(default=1.0)
    max_steps: int = field(default=-1, metadata={"help": "overrides epochs when > 0"})
    per_device_batch: int = field(default=2)
    gradient_accumulation: int = field(default=4)
    max_length: int = field(
        default=1024, metadata={"help": "longer rows are left out of training (counted in the run card), not cut"}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast where the hardware has it"})
    logging_steps: int = field(default=5)
    seed: int = field(default=0)
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = all cores"})


@dataclass
class SFTJobConfig(LoRAJobConfig):
    output_dir: str = field(
        default="runs/sft", metadata={"help": "checkpoints, the adapter, the run card and the curve"}
    )
    data: str = field(
        default="runs/data/unified", metadata={"help": "a DatasetDict folder with prompt/completion rows"}
    )
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (resume picks the latest)"})
    eval_steps: int = field(default=50)
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint in output_dir"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute activations in the backward pass: less memory, slower (TRL turns it on by default; "
            "on a small CPU model it costs far more time than it saves memory)"
        },
    )


def has_fast_bf16() -> bool:
    """A CPU with native bf16 arithmetic (AVX512-BF16 or AMX): autocast pays off there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lora_config(job: LoRAJobConfig, task_type: str) -> LoraConfig:
    """The adapter a job trains; ``task_type`` is PEFT's ("CAUSAL_LM", or "SEQ_CLS" to also train a scalar head)."""
    from peft import LoraConfig

    return LoraConfig(
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules=[m for m in job.target_modules.split(",") if m],
        task_type=task_type,
    )


def trainer_arguments(job: LoRAJobConfig, kind: type[Arguments], **specific) -> Arguments:
    """TRL's arguments of class ``kind`` (SFTConfig, DPOConfig, RewardConfig) with every field a job shares set here.

    ``specific`` is what only that trainer needs; repeating a shared field there is a TypeError,
    so a trainer cannot quietly override the job.
    """
    import torch

    cuda = torch.cuda.is_available()
    return kind(
        output_dir=job.output_dir,
        learning_rate=job.learning_rate,
        num_train_epochs=job.epochs,
        max_steps=job.max_steps,
        per_device_train_batch_size=job.per_device_batch,
        per_device_eval_batch_size=job.per_device_batch,
        gradient_accumulation_steps=job.gradient_accumulation,
        max_length=job.max_length,
        bf16=job.bf16 and (cuda or has_fast_bf16()),
        use_cpu=not cuda,
        seed=job.seed,
        logging_steps=job.logging_steps,
        report_to=[],
        dataloader_num_workers=0,
        **specific,
    )
