"""Configuration of a LoRA fine-tuning run: a documented dataclass that is also the CLI's flags.

Defaults are sized for the embedded SmolLM2-135M on 2 CPU cores (ENVIRONMENT.md: bf16
weights ~360 tokens/s, fp32 weights with bf16 autocast ~430 tokens/s; micro-batches of 2
with accumulation keep memory near 4.5 GB). For a Qwen3 ReflectRM on a GPU, change
``base_model``, ``max_length`` (4096+), ``per_device_batch`` and ``learning_rate`` (1e-4),
and launch with ``accelerate launch`` for several GPUs: nothing in the code changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoRAJobConfig:
    """What every LoRA training job here shares (SFT, STaR-DPO, the Bradley-Terry baseline)."""

    base_model: str = field(default="embedded", metadata={"help": "'embedded', a model folder or a hub id"})
    output_dir: str = field(default="runs/job", metadata={"help": "checkpoints, the adapter, the run card and the curve"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling"})
    learning_rate: float = field(default=2e-4)
    epochs: float = field(default=1.0)
    max_steps: int = field(default=-1, metadata={"help": "overrides epochs when > 0"})
    per_device_batch: int = field(default=2)
    gradient_accumulation: int = field(default=4)
    max_length: int = field(default=1024, metadata={"help": "longer rows are left out of training (counted in the run card), not cut"})
    logging_steps: int = field(default=5)
    seed: int = field(default=0)
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = all cores"})


@dataclass
class SFTJobConfig(LoRAJobConfig):
    output_dir: str = field(default="runs/sft", metadata={"help": "checkpoints, the adapter, the run card and the curve"})
    data: str = field(default="runs/data/unified", metadata={"help": "a DatasetDict folder with prompt/completion rows"})
    lora_dropout: float = field(default=0.05)
    target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "comma-separated module names"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast where the hardware has it"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (resume picks the latest)"})
    eval_steps: int = field(default=50)
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint in output_dir"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: less memory, slower (TRL turns it on by default; "
                "on a small CPU model it costs far more time than it saves memory)"})
