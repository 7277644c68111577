"""LoRA training tokens/s through our SFT job (TRL's SFTTrainer) against a bare transformers loop on the same batches.

    .venv/bin/python bench/lora_throughput.py [--steps 6] [--rows 64] [--out bench/results/lora-throughput.json]

Rows: response-preference rows (the Analyze prompt as inference renders it, the teacher's analysis and
verdict as the target) from the GPT-4-turbo judgments in ../shared/data/teacher, the data a distilled
judge trains on. First the trainer runs ``--steps`` optimizer steps of the job's defaults (embedded
SmolLM2-135M, float32 weights with bf16 autocast where the CPU has it, LoRA on the attention projections, micro-batch 2 x 4 accumulation); a wrapper
around its collator records every batch it made. Then a bare loop trains a fresh copy of the same
LoRA model on exactly those batches: forward with labels (transformers' own loss over full logits, under the same autocast),
backward, AdamW step. The first optimizer step of each is a warm-up and not timed. Reported: tokens/s
(non-padding tokens of the timed batches), the ratio trainer/bare, and the trainer's time by phase
(from a torch profiler pass over one extra step), so "where the rest goes" is measured, not guessed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from provenance import provenance  # bench/, beside this script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def teacher_rows(n: int, context_chars: int) -> list[dict]:
    from reflectagent.adapter import JudgeAdapter
    from reflectagent.finetune.data import DataConfig, Trace, response_rows
    from reflectagent.results import Judgment
    from reflectagent.teacher import read_teacher

    judgments, _ = read_teacher(SHARED / "teacher" / "alpaca_eval_gpt4_turbo.jsonl")
    config, adapter, rows = DataConfig(context_chars=context_chars, rationalize=False), JudgeAdapter(), []
    for j in judgments:
        if j.preference not in ("A", "B"):
            continue
        trace = Trace(j.pair, Judgment(preference=j.preference, analyses=(j.as_analysis(False), j.as_analysis(True))))
        rows += response_rows(trace, adapter, config)
        if len(rows) >= n:
            return rows[:n]
    return rows


class Recorder:
    """A collator that keeps every batch it makes (the bare loop replays them)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.batches.append({k: v.clone() for k, v in batch.items() if hasattr(v, "clone")})
        return batch


def step_times(profiled_step: int):
    """A callback with each optimizer step's end time, and a torch profile of step ``profiled_step`` (not timed)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends, self.profile = [], profile(activities=[ProfilerActivity.CPU])

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == profiled_step:
                self.profile.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == profiled_step:
                self.profile.__exit__(None, None, None)
            else:
                self.ends.append(time.perf_counter())

        def top_ops(self, n: int = 12) -> dict[str, float]:
            """Self CPU seconds by operator in the profiled step: where the trainer's time goes."""
            table = sorted(self.profile.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
            return {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in table}

    return StepTimes()


def lora_model(base: str, config):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from reflectagent.finetune.sft_config import lora_config

    torch.manual_seed(config.seed)
    return get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora_config(config, "CAUSAL_LM")
    )


def bare_loop(model, batches: list[dict], accumulation: int, learning_rate: float, bf16: bool) -> list[float]:
    """Optimizer steps over ``batches`` (``accumulation`` micro-batches each); the time at each step's end.

    ``bf16``: forward under bf16 autocast, as the Trainer does when its arguments say ``bf16``.
    """
    import contextlib

    import torch

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0
    )
    model.train()
    ends = []
    for start in range(0, len(batches) - accumulation + 1, accumulation):
        for batch in batches[start : start + accumulation]:
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
            inputs["use_cache"] = False  # as the trainer's forward: no key-value cache built in training
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = model(**inputs).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the Trainer does (max_grad_norm 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=6,
        help="optimizer steps on each side (the first is a warm-up); the trainer runs one more, profiled",
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument(
        "--context-chars",
        type=int,
        default=1500,
        help="prompt budget of each row; longer rows would not fit max_length",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora-throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import tempfile

    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from reflectagent.finetune.sft_config import SFTJobConfig
    from reflectagent.finetune.sft_trainer import drop_too_long, sft_arguments, sft_trainer, start_run

    with tempfile.TemporaryDirectory() as work:
        # one step more than timed: the last runs under the profiler
        config = SFTJobConfig(
            output_dir=work, max_steps=args.steps + 1, save_steps=10_000, logging_steps=1, resume=False
        )
        base, _, tokenizer = start_run(config)
        # Draw rows until enough fit max_length, so every timed step has all its micro-batches (no epoch's short tail).
        drawn, _ = drop_too_long(
            datasets.Dataset.from_list(teacher_rows(4 * args.rows, args.context_chars)), tokenizer, config.max_length
        )
        needed = max(args.rows, (args.steps + 1) * config.per_device_batch * config.gradient_accumulation)
        if len(drawn) < needed:
            raise SystemExit(
                f"only {len(drawn)} rows fit max_length={config.max_length}; {needed} are "
                "needed: lower --context-chars or --steps"
            )
        rows = drawn.select(range(needed))
        train_args, peft_config = sft_arguments(config, evaluate=False)
        train_args.disable_tqdm = True
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        trainer = sft_trainer(
            model=model, args=train_args, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
        )
        recorder, timer = Recorder(trainer.data_collator), step_times(profiled_step=args.steps + 1)
        trainer.data_collator = recorder
        trainer.add_callback(timer)
        started = time.perf_counter()
        trainer.train()
        trainer_ends = [started, *timer.ends]
        batches = recorder.batches[: args.steps * config.gradient_accumulation]
        phases = timer.top_ops()
        del trainer, model

        bare_ends = [
            time.perf_counter(),
            *bare_loop(
                lora_model(base, config), batches, config.gradient_accumulation, config.learning_rate, train_args.bf16
            ),
        ]

    accumulation = config.gradient_accumulation
    timed_tokens = sum(tokens(b) for b in batches[accumulation:])  # the first optimizer step is the warm-up
    trainer_s, bare_s = trainer_ends[-1] - trainer_ends[1], bare_ends[-1] - bare_ends[1]
    result = {
        **provenance(),
        "model": "embedded SmolLM2-135M, float32 weights",
        "steps_timed": args.steps - 1,
        "micro_batch": config.per_device_batch,
        "accumulation": accumulation,
        "rows": len(rows),
        "timed_tokens": timed_tokens,
        "bf16": train_args.bf16,
        "trainer_tokens_per_s": round(timed_tokens / trainer_s, 1),
        "bare_tokens_per_s": round(timed_tokens / bare_s, 1),
        "ratio": round(bare_s / trainer_s, 3),  # trainer tokens/s over bare tokens/s
        "trainer_step_s": [round(b - a, 2) for a, b in zip(trainer_ends[1:], trainer_ends[2:])],
        "bare_step_s": [round(b - a, 2) for a, b in zip(bare_ends[1:], bare_ends[2:])],
        "trainer_top_ops_self_cpu_s": phases,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
