"""LoRA supervised fine-tuning on the unified data, with TRL's SFTTrainer (loss on targets only).

The rows are chat messages rendered by the inference adapter; TRL applies the model's
chat template exactly as vLLM does when serving, and computes the loss on the completion
(the analysis/reflection JSON) only. Seeds, a progress bar, checkpoints and resume come
from ``transformers.Trainer``; the curve is saved as a PNG and a run card as JSON.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from reflectagent.finetune.sft_config import LoRAJobConfig, SFTJobConfig

logger = logging.getLogger(__name__)


def has_fast_bf16() -> bool:
    """A CPU with native bf16 arithmetic (AVX512-BF16 or AMX): autocast pays off there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _latest_checkpoint(folder: Path) -> str | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def plot_curve(log_history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (targets only)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drop_too_long(rows, tokenizer, max_length: int, targets=("completion",)):
    """Rows whose prompt plus longest target fits ``max_length`` tokens, and how many did not.

    Truncating instead would cut the system message (left) or the verdict (right): either way
    the model would train on text it is never served. Dropped rows are counted in the run card.
    """
    def fits(row) -> bool:
        longest = max((row[t] for t in targets), key=lambda m: len(m[0]["content"]))
        return len(tokenizer.apply_chat_template(row["prompt"] + longest, tokenize=True, return_dict=False)) <= max_length

    kept = rows.filter(fits)
    if len(kept) < len(rows):
        logger.warning("dropped %d of %d rows longer than max_length=%d tokens", len(rows) - len(kept), len(rows), max_length)
    return kept, len(rows) - len(kept)


def start_run(config: LoRAJobConfig):
    """Threads, the base model folder, the output folder and a tokenizer that can pad: every job's first steps."""
    import torch
    from transformers import AutoTokenizer

    from reflectagent.models import prepare_model

    if config.threads:
        torch.set_num_threads(config.threads)
    base = prepare_model(config.base_model)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return base, out, tokenizer


def train_sft(config: SFTJobConfig) -> Path:
    """Train a LoRA adapter; return the adapter folder (servable with ``reflectagent serve --lora``)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    base, out, tokenizer = start_run(config)
    data = datasets.load_from_disk(config.data)
    train, too_long = drop_too_long(data["train"], tokenizer, config.max_length)
    dev = drop_too_long(data["dev"], tokenizer, config.max_length)[0] if "dev" in data else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cpu_bf16 = config.bf16 and (torch.cuda.is_available() or has_fast_bf16())
    args = SFTConfig(
        output_dir=str(out),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch,
        per_device_eval_batch_size=config.per_device_batch,
        gradient_accumulation_steps=config.gradient_accumulation,
        max_length=config.max_length,
        completion_only_loss=True,
        bf16=cpu_bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if dev is not None and len(dev) else "no",
        eval_steps=config.eval_steps,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=False,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    peft_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=[m for m in config.target_modules.split(",") if m], task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev if args.eval_strategy != "no" else None,
                         processing_class=tokenizer, peft_config=peft_config)
    started = time.perf_counter()
    resume_from = _latest_checkpoint(out) if config.resume else None
    if resume_from:
        logger.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    adapter = out / "adapter"
    trainer.model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    history = trainer.state.log_history
    plot_curve(history, out / "training_curve.png")
    losses = [e["loss"] for e in history if "loss" in e]
    card = {
        "config": asdict(config), "base_model": str(base), "train_rows": len(train), "dropped_too_long": too_long, "dev_rows": len(dev) if dev else 0,
        "rows_by_kind": dict(Counter(train["kind"])) if "kind" in train.column_names else {},
        "steps": trainer.state.global_step, "seconds": time.perf_counter() - started,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss, "bf16": cpu_bf16, "resumed_from": resume_from,
        "eval_loss": next((e["eval_loss"] for e in reversed(history) if "eval_loss" in e), None),
    }
    (out / "run_card.json").write_text(json.dumps(card, indent=2))
    return adapter
