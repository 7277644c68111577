"""Export a trained adapter: as is, a PEFT folder that ``reflectagent serve --lora NAME=DIR``
serves, or merged into a full model folder, which vLLM serves as a plain model.

Merging costs disk (a full copy of the weights) and buys speed: on CPU, vLLM's prefill of a
long judge prompt is several times slower through a LoRA adapter than through merged weights
(ENVIRONMENT.md), so a single fine-tuned judge is best served merged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from reflectagent.serving.sources import DEFAULT_DTYPE

logger = logging.getLogger(__name__)


def merge_adapter(
    adapter: str | Path, out: str | Path, base_model: str = "embedded", dtype: str = DEFAULT_DTYPE
) -> Path:
    """Fold the LoRA ``adapter`` into ``base_model`` and save a servable model folder at ``out``."""
    from reflectagent.serving.convert import merge_lora
    from reflectagent.serving.models import prepare_model

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    base = prepare_model(base_model)
    tokenizer_from = adapter if (adapter / "tokenizer_config.json").exists() else base
    merge_lora(base, adapter, out, dtype, tokenizer_from=tokenizer_from)
    logger.info("merged %s into %s -> %s", adapter, base, out)
    return out
