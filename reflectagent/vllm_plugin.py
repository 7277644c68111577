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
PLUGIN_GROUP, PLUGIN_NAME = "vllm.general_plugins", "reflectagent_cpu_lora"  # as pyproject.toml declares it

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")  # the sgmv_* (prefill) ops call these by name


def skipping_unset(op):
    """``op`` (a torch bgmv op: ``op(inputs, weights, output, indices, ...)``) with the rows of tokens whose
    LoRA index is negative left untouched, as the GPU kernels leave them."""

    @functools.wraps(op)
    def mended(inputs, weights, output, indices, *args, **kwargs):
        unset = indices < 0
        if not bool(unset.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        rows = output.shape[0]
        if unset.shape[0] == 1 and rows != 1:  # one index broadcast over every row (vLLM's ``limit = 1``)
            unset = unset.expand(rows)
        elif unset.shape[0] > rows:  # more tokens than rows: the op keeps the first rows (``outputs[:limit]``)
            unset = unset[:rows]
        if unset.shape[0] != rows:
            raise RuntimeError(
                f"vLLM's {op.__name__} was given {indices.shape[0]} LoRA indices for "
                f"{rows} rows; reflectagent's mend does not know this layout"
            )
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
    """vLLM's entry point: mend the CPU LoRA ops where they need it (see the module's docstring).

    vLLM calls its plugins without a ``try``: anything raised here would stop every vLLM process in the environment,
    whatever it serves. So nothing is raised: a check or a mend that fails is told on vLLM's log (a warning: base-model
    requests batched with adapter requests may be computed with the adapter), and vLLM starts as it is."""
    try:
        _mend()
    except Exception as exc:
        logger.warning(
            "reflectagent: the mend of vLLM's CPU LoRA ops was not applied (%s: %s); on a CPU server with "
            "LoRA adapters, base-model requests batched with adapter requests may be computed with an adapter",
            type(exc).__name__,
            exc,
        )


def _mend() -> None:
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without LoRA ops: nothing to mend
        return
    if getattr(lora_ops.bgmv_shrink, "reflectagent_mended", False) or not applies_adapter_to_unset(
        lora_ops.bgmv_shrink
    ):
        return
    modules = [lora_ops, torch_ops, sys.modules.get("vllm.lora.punica_wrapper.punica_cpu")]
    mended = {name: skipping_unset(getattr(lora_ops, name)) for name in _OPS}  # all made before any is set
    for name, op in mended.items():
        for module in modules:
            if module is not None and hasattr(module, name):
                setattr(module, name, op)
    logger.info("reflectagent: vLLM's CPU LoRA ops now leave base-model tokens (LoRA index -1) without an adapter")
