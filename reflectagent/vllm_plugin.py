"""A vLLM plugin that keeps a LoRA adapter out of the base model's requests on the CPU.

vLLM marks a token that takes no adapter with the LoRA index ``-1``. Its GPU kernels skip such tokens; the
PyTorch ops its CPU platform uses (``vllm/lora/ops/torch_ops/lora_ops.py``) index the stacked adapters with
it, and ``weights[-1]`` is the *last loaded adapter*. So on a CPU server started with ``--enable-lora``, a
request for the base model that shares a batch with an adapter's request is computed with that adapter:
wrong log-probabilities and verdicts, no error (reflectagent's test saw the base model's P(A) equal the
adapter's; vLLM PR #48421, open at 0.32). A judge served beside its fine-tuned self, the common case in
``finetune`` and ``eval --compare``, would be measured against a contaminated baseline.

reflectagent registers :func:`register` under vLLM's ``vllm.general_plugins`` entry point, which every vLLM
process in this environment runs at start-up (the API server, the engine, the worker). It checks the ops
on a one-element example and, only where they apply an adapter to index ``-1``, wraps them so those
tokens' output rows are left as they were, exactly what the GPU kernels' early exit does. Once vLLM mends
its ops the check passes and nothing is changed. ``VLLM_PLUGINS`` (vLLM's allow-list) can leave it out.
"""

from __future__ import annotations

import functools
import logging
import sys

logger = logging.getLogger("vllm.reflectagent")  # under vLLM's logger, so its log says so

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")  # the sgmv_* (prefill) ops call these by name


def skipping_unset(op):
    """``op`` (a torch bgmv op: ``op(inputs, weights, output, indices, ...)``) with the rows of tokens whose
    LoRA index is negative left untouched, as the GPU kernels leave them."""

    @functools.wraps(op)
    def mended(inputs, weights, output, indices, *args, **kwargs):
        unset = indices < 0
        if not bool(unset.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        if unset.shape[0] != output.shape[0]:  # one index broadcast over every row (vLLM's ``limit = 1``)
            unset = unset.expand(output.shape[0]) if unset.numel() == 1 else None
        if unset is None:
            raise RuntimeError(f"vLLM's {op.__name__} was given {indices.shape[0]} LoRA indices for "
                               f"{output.shape[0]} rows; reflectagent's mend does not know this layout")
        kept = output[unset].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[unset] = kept
        return result

    mended.reflectagent_mended = True
    return mended


def applies_adapter_to_unset(op) -> bool:
    """Whether ``op`` (``bgmv_shrink``) adds an adapter's product to a token whose LoRA index is -1."""
    import torch

    output = torch.zeros(1, 1)
    op(torch.ones(1, 1), torch.ones(1, 1, 1, 1), output, torch.tensor([-1]))
    return bool(output.abs().sum() > 0)


def register() -> None:
    """vLLM's entry point: mend the CPU LoRA ops where they need it (see the module's docstring)."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without LoRA ops: nothing to mend
        return
    if getattr(lora_ops.bgmv_shrink, "reflectagent_mended", False) or not applies_adapter_to_unset(lora_ops.bgmv_shrink):
        return
    modules = [lora_ops, torch_ops, sys.modules.get("vllm.lora.punica_wrapper.punica_cpu")]
    for name in _OPS:
        mended = skipping_unset(getattr(lora_ops, name))
        for module in modules:
            if module is not None and hasattr(module, name):
                setattr(module, name, mended)
    logger.info("reflectagent: vLLM's CPU LoRA ops now leave base-model tokens (LoRA index -1) without an adapter")
