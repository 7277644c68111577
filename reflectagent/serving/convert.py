"""Model folders made from other models: a GGUF dequantised into a Hugging Face folder, a LoRA adapter folded into
its base. Each lands whole (:func:`reflectagent.serving.sources.landing`), with its source recorded beside it."""

from __future__ import annotations

import logging
from pathlib import Path

from reflectagent.errors import ReflectAgentError
from reflectagent.serving.sources import DEFAULT_DTYPE, landing

logger = logging.getLogger(__name__)


class ModelPreparationError(ReflectAgentError, RuntimeError):
    """The model folder could not be produced; the message says what to do."""


def convert_gguf(gguf: Path, out: Path, dtype: str = DEFAULT_DTYPE, *, source: dict | None = None) -> Path:
    """Dequantise a GGUF into a Hugging Face folder (weights, tokenizer, chat template).

    ``source`` (e.g. a preset with its verified hash) is written into the folder as
    ``SOURCE_FILE``. A failed conversion removes its partial folder.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ModelPreparationError(
            "converting a GGUF needs torch, transformers and gguf: install reflectagent[serve]"
        ) from exc
    logger.info("converting %s -> %s (%s)", gguf.name, out, dtype)
    with landing(out, gguf.name, source) as partial:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A dequantised GGUF still carries its quantisation config, which save_pretrained refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return out


def merge_lora(
    base: Path,
    adapter: Path,
    out: Path,
    dtype: str = DEFAULT_DTYPE,
    *,
    source: dict | None = None,
    tokenizer_from: Path | None = None,
) -> Path:
    """Fold a PEFT LoRA ``adapter`` into the ``base`` folder and save a plain model folder at ``out``.

    In ``dtype``: merge in the dtype the result is served in, so the adapter's small deltas are not
    rounded away. Like :func:`convert_gguf`, it lands atomically, replacing a model folder already at
    ``out`` (never a folder of other files), and ``source`` is written beside the weights; the
    tokenizer comes from ``tokenizer_from`` (default: the base).
    """
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ModelPreparationError(
            "merging a LoRA adapter needs torch, transformers and peft: install reflectagent[finetune]"
        ) from exc
    if not (adapter / "adapter_config.json").exists():
        raise ModelPreparationError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    if out.exists() and not (out / "config.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelPreparationError(
            f"{out} holds files but no model, and a merge replaces the whole folder: give an empty or new folder"
        )
    logger.info("merging %s into %s -> %s (%s)", adapter, base, out, dtype)
    with landing(out, adapter.name, source) as partial:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(partial)
        del model
        AutoTokenizer.from_pretrained(tokenizer_from or base).save_pretrained(partial)
    return out
