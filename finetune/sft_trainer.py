"""LoRA supervised fine-tuning on the unified data, with TRL's SFTTrainer (loss on targets only).

The rows are chat messages rendered by the inference adapter; TRL applies the model's
chat template exactly as vLLM does when serving, and computes the loss on the completion
(the analysis/reflection JSON) only. Seeds, a progress bar, checkpoints and resume come
from ``transformers.Trainer``; the curve is saved as a PNG and a run card as JSON.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from reflectagent.finetune.run_card import RunCard, losses
from reflectagent.finetune.sft_config import LoRAJobConfig, SFTJobConfig, lora_config, trainer_arguments

if TYPE_CHECKING:
    from peft import LoraConfig
    from trl import SFTConfig

logger = logging.getLogger(__name__)


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
        return (
            len(tokenizer.apply_chat_template(row["prompt"] + longest, tokenize=True, return_dict=False)) <= max_length
        )

    kept = rows.filter(fits)
    if len(kept) < len(rows):
        logger.warning(
            "dropped %d of %d rows longer than max_length=%d tokens", len(rows) - len(kept), len(rows), max_length
        )
    return kept, len(rows) - len(kept)


def start_run(config: LoRAJobConfig):
    """Threads, the base model folder, the output folder and a tokenizer that can pad: every job's first steps."""
    import torch
    from transformers import AutoTokenizer

    from reflectagent.serving.models import prepare_model

    if config.threads:
        torch.set_num_threads(config.threads)
    base = prepare_model(config.base_model)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return base, out, tokenizer


def sft_arguments(config: SFTJobConfig, evaluate: bool) -> tuple[SFTConfig, LoraConfig]:
    """TRL's SFTConfig and the LoRA adapter for an SFT job; ``evaluate``: there are dev rows to score."""
    from trl import SFTConfig

    args = trainer_arguments(
        config,
        SFTConfig,
        completion_only_loss=True,
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps,
        disable_tqdm=False,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    return args, lora_config(config, "CAUSAL_LM")


def completion_loss(model, inputs: dict, num_items_in_batch=None):
    """Transformers' causal-LM loss (summed over target tokens, divided by ``num_items_in_batch`` when given,
    else their mean), with the LM head run only from the position before the batch's first target on
    (``logits_to_keep``): the same loss and gradients, without the head's product over the prompt."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    if labels.shape[1] < 2:
        raise ValueError("a training row needs at least two tokens: one to read and one to predict")
    targets = (labels[:, 1:] != -100).any(dim=0).nonzero()
    first = int(targets[0]) + 1 if len(targets) else labels.shape[1] - 1  # the first position any row is scored at
    keep = labels.shape[1] - first + 1  # ... and the position before it, which predicts it
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep, use_cache=False)
    scored = labels[:, first:]
    logits = outputs.logits[:, -keep:]  # a model that ignores logits_to_keep returns every position
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), scored.flatten(), ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (scored != -100).sum()
    if torch.is_tensor(count):
        count = count.to(loss.device)
    return loss / max(count, 1), outputs  # a batch with no target adds nothing (not NaN)


def sft_trainer(**kwargs):
    """TRL's SFTTrainer; off CUDA and XPU, its loss is transformers' plain cross-entropy, computed by :func:`completion_loss`.

    TRL computes the loss through a fused, chunked LM head: on GPUs with Triton it scores only the target
    positions and saves the memory of the full logits. Elsewhere it scores every position through a loop of
    torch ops that also folds entropy and top-1 for its logged metrics, and its backward recomputes every tile
    of the head. On a CPU that costs a quarter of each step (``bench/lora_throughput.py``: 0.74x a bare loop
    on the same batches). Without it the run logs no ``entropy``, ``mean_token_accuracy`` or ``num_tokens``;
    the loss is the same cross-entropy on the same target tokens.

    Off GPU the LM head also runs only from the batch's first target position on (:func:`completion_loss`):
    a verdict row's target is a few tokens after hundreds of prompt tokens. Rows are padded on the right, so
    in a batch of rows of different lengths it still runs over the longer rows' tails.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class SFTTrainerPlainHeadOffGPU(SFTTrainer):
        # transformers decides the loss's scaling for gradient accumulation from the model, on either path
        # (same train_loss to 4 digits over 7 steps of 4 micro-batches: bench/results/lora-throughput*.json)
        loss_is_scaled_for_ga = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if inputs["input_ids"].device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if (
                self.args.label_smoothing_factor
                or self.compute_loss_func is not None
                or getattr(self.args, "loss_type", "nll") != "nll"
                or getattr(self, "aux_loss_enabled", False)
                or (self.args.average_tokens_across_devices and self.args.world_size > 1)
            ):
                # what completion_loss does not do: transformers' own loss does
                return Trainer.compute_loss(
                    self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            loss, outputs = completion_loss(model, inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return SFTTrainerPlainHeadOffGPU(**kwargs)


def train_sft(config: SFTJobConfig) -> Path:
    """Train a LoRA adapter; return the adapter folder (servable with ``reflectagent serve --lora``)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    base, out, tokenizer = start_run(config)
    data = datasets.load_from_disk(config.data)
    train, too_long = drop_too_long(data["train"], tokenizer, config.max_length)
    dev = drop_too_long(data["dev"], tokenizer, config.max_length)[0] if "dev" in data else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args, peft_config = sft_arguments(config, evaluate=dev is not None and len(dev) > 0)
    trainer = sft_trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
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
    first_loss, final_loss, eval_loss = losses(history)
    RunCard(
        config=asdict(config),
        base_model=str(base),
        steps=trainer.state.global_step,
        seconds=time.perf_counter() - started,
        train_loss=result.training_loss,
        first_loss=first_loss,
        final_loss=final_loss,
        eval_loss=eval_loss,
        train_rows=len(train),
        dropped_too_long=too_long,
        dev_rows=len(dev) if dev else 0,
        rows_by_kind=dict(Counter(train["kind"])) if "kind" in train.column_names else {},
        bf16=args.bf16,
        resumed_from=resume_from,
    ).write(out)
    return adapter
