"""Configuration of the whole fine-tuning loop (``reflectagent finetune run --config FILE``).

One YAML/TOML file: the loop's own keys at the top level, and the sections ``data``
(:class:`DataConfig`), ``sft`` (:class:`SFTJobConfig`) and ``reward`` (:class:`RewardJobConfig`)
for the stages they configure. The defaults are the documented run (~1 h 50 min on 2 CPU cores) with
the embedded SmolLM2-135M; a GPU user changes ``base_model``, the sizes and ``sft`` (see docs/finetune.md).
The default ``train_data`` and ``unseen_data`` are files of the data folder (:func:`reflectagent.paths.data_dir`:
``$REFLECTAGENT_DATA_DIR``, in a source checkout ``../shared/data`` beside it); paths given in a file or as
overrides are relative to the folder the command runs in.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectagent.calling.config import ConfigError, read_config_file
from reflectagent.finetune.data import DataConfig
from reflectagent.finetune.reward import RewardJobConfig
from reflectagent.finetune.sft_config import SFTJobConfig
from reflectagent.paths import data_dir
from reflectagent.serving.sources import DEFAULT_CONTEXT

TRAIN_FILES = ("hh_rlhf_harmless_test.jsonl", "rmbench.jsonl", "hhh_alignment.jsonl")
UNSEEN_FILES = ("pandalm.jsonl", "autoj_pairwise.jsonl")


def _in_data_dir(names: tuple[str, ...]):
    # looked up when a config leaves the key out, so naming the files needs no data folder
    return lambda: ",".join(str(data_dir() / name) for name in names)


def _loop_sft() -> SFTJobConfig:
    # Measured here: ~45 s per optimizer step of 8 rows (~700 tokens each) with TRL's SFTTrainer on
    # 2 CPU cores (a bare PyTorch loop does ~37 s). 30 steps (240 rows) is about one epoch of the
    # default data; 12 steps taught the format only partly (the student still looped).
    return SFTJobConfig(
        max_steps=30,
        learning_rate=3e-4,
        per_device_batch=2,
        gradient_accumulation=4,
        max_length=1024,
        save_steps=10,
        eval_steps=15,
        logging_steps=1,
    )


def _loop_reward() -> RewardJobConfig:
    return RewardJobConfig(max_steps=24, learning_rate=3e-4, logging_steps=1)


@dataclass
class LoopConfig:
    """Traces -> data -> train (response-only, unified, Bradley-Terry) -> serve -> eval."""

    output_dir: str = field(default="runs/loop", metadata={"help": "everything the loop makes; re-running resumes"})
    base_model: str = field(
        default="embedded", metadata={"help": "'embedded' or a model folder (both teacher base and student)"}
    )
    train_data: str = field(
        default_factory=_in_data_dir(TRAIN_FILES),
        metadata={"help": "labelled pair files to train on (held-out pairs of these are the in-distribution dev set)"},
    )
    unseen_data: str = field(
        default_factory=_in_data_dir(UNSEEN_FILES),
        metadata={"help": "pair files never trained on (the out-of-distribution eval)"},
    )
    max_pair_chars: int = field(
        default=1500, metadata={"help": "use pairs whose prompt + responses fit in this many characters"}
    )
    train_pairs: int = field(default=200, metadata={"help": "training pairs, balanced over the training sources"})
    dev_pairs: int = field(default=50, metadata={"help": "held-out pairs of the training sources"})
    unseen_pairs: int = field(default=50, metadata={"help": "pairs of the unseen sources"})
    teacher_backend: str = field(
        default="embedded", metadata={"help": "backend name (config file) that writes the traces"}
    )
    samples: int = field(default=2, metadata={"help": "teacher analyses per pair (alternating orders)"})
    temperature: float = field(default=0.8, metadata={"help": "teacher temperature after the first sample"})
    concurrency: int = field(default=16, metadata={"help": "requests in flight (vLLM on CPU peaks near 16)"})
    programs: str = field(
        default="genrm-both,reflectrm", metadata={"help": "inference programs to evaluate every model with"}
    )
    unconstrained: str = field(
        default="base,unified", metadata={"help": "models also evaluated (GenRM) without constrained decoding"}
    )
    unconstrained_pairs: int = field(default=30, metadata={"help": "pairs of each eval set judged without constraints"})
    unconstrained_max_tokens: int = field(default=256, metadata={"help": "completion budget without constraints"})
    serve: str = field(
        default="merged",
        metadata={"help": "'merged' (one server per model; fast on CPU) or 'lora' (one server, --lora-modules)"},
    )
    max_model_len: int = field(
        default=DEFAULT_CONTEXT, metadata={"help": "context length of the servers the loop starts"}
    )
    bradley_terry: bool = field(default=True, metadata={"help": "train and evaluate the scalar baseline"})
    dpo: bool = field(default=False, metadata={"help": "also train STaR-DPO on top of the unified adapter"})
    seed: int = field(default=0)
    data: DataConfig = field(default_factory=lambda: DataConfig(fractions="0.9,0.1,0"))
    sft: SFTJobConfig = field(default_factory=_loop_sft)
    reward: RewardJobConfig = field(default_factory=_loop_reward)

    def files(self, which: str) -> list[str]:
        return [f.strip() for f in getattr(self, which).split(",") if f.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(kind, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values


def load_loop_config(path: str | Path | None = None, **overrides) -> LoopConfig:
    """Read a loop config file (YAML or TOML); unknown keys are an error, missing ones take defaults."""
    values = dict(read_config_file(Path(path))) if path else {}
    values.update(overrides)
    for key in ("train_data", "unseen_data"):  # absolute, so loop_config.json says where the data came from
        if key in values:
            values[key] = ",".join(os.path.abspath(f.strip()) for f in str(values[key]).split(",") if f.strip())
    sections = {"data": DataConfig, "sft": SFTJobConfig, "reward": RewardJobConfig}
    _build(LoopConfig, values, str(path or "loop config"))
    defaults = {f.name: f.default_factory for f in dataclasses.fields(LoopConfig) if f.name in sections}
    for name, kind in sections.items():
        given = values.pop(name, None) or {}
        _build(kind, given, f"{path}: [{name}]")
        values[name] = dataclasses.replace(defaults[name](), **given)
    try:
        config = LoopConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if config.serve not in ("merged", "lora"):
        raise ConfigError(f"serve must be 'merged' or 'lora', got {config.serve!r}")
    return config
