"""vLLM's CPU LoRA ops, as reflectagent's plugin mends them: a token with LoRA index -1 gets no adapter."""

import importlib.metadata

import pytest
import torch

from reflectagent.vllm_plugin import applies_adapter_to_unset, register, skipping_unset

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def unmended(name):
    op = getattr(lora_ops, name)
    return getattr(op, "__wrapped__", op)


def test_vllms_own_op_applies_the_last_adapter_to_a_base_token():
    """The bug the plugin exists for; once vLLM mends it, this test says the plugin can go."""
    assert applies_adapter_to_unset(unmended("bgmv_shrink"))


@pytest.mark.parametrize("add_inputs", [True, False])
def test_mended_ops_leave_base_rows_as_they_were_and_adapter_rows_as_vllm_computes_them(add_inputs):
    torch.manual_seed(0)
    weights = torch.randn(2, 1, 6, 4)  # two adapters, out 6, in 4
    inputs = torch.randn(3, 4)
    indices = torch.tensor([0, -1, 1])
    before = torch.randn(3, 6)

    expected = before.clone()
    unmended("bgmv_expand")(inputs, weights, expected, indices.clamp(min=0), add_inputs)
    mended = before.clone()
    skipping_unset(unmended("bgmv_expand"))(inputs, weights, mended, indices, add_inputs)
    assert torch.equal(mended[1], before[1])  # the base token: untouched
    assert torch.equal(mended[[0, 2]], expected[[0, 2]])  # the adapters' tokens: vLLM's own result
    assert not torch.equal(mended[0], before[0])

    sliced = torch.zeros(3, 8)
    skipping_unset(unmended("bgmv_expand_slice"))(inputs, weights, sliced, indices, 2, 6, add_inputs)
    assert torch.equal(sliced[1], torch.zeros(8)) and sliced[0, 2:].abs().sum() > 0


def test_register_is_found_by_vllm_and_mends_every_name_the_cpu_wrapper_uses():
    names = {e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "reflectagent.vllm_plugin:register" in names
    register()
    register()  # vLLM loads plugins once per process, but may in several: a second call wraps nothing twice
    from vllm.lora.ops import torch_ops

    for module in (lora_ops, torch_ops):
        assert not applies_adapter_to_unset(module.bgmv_shrink)
        assert module.bgmv_shrink.__wrapped__ is unmended("bgmv_shrink")
    # prefill (sgmv) goes through the mended bgmv by name
    out = torch.zeros(2, 1)
    lora_ops.sgmv_shrink(
        torch.ones(2, 1), torch.ones(1, 1, 1, 1), out, None, torch.tensor([1, 1]), torch.tensor([0, -1]), 2, 1, 2, 1.0
    )
    assert out.tolist() == [[1.0], [0.0]]


@pytest.mark.parametrize("add_inputs", [True, False])
def test_more_indices_than_output_rows_are_cut_as_vllms_op_cuts_them(add_inputs):
    """vLLM's bgmv_expand keeps the first rows of its product when it is given more tokens than output rows
    (``outputs[:limit]``); the mend raised RuntimeError there. It cuts its rows the same way now."""
    torch.manual_seed(0)
    weights = torch.randn(2, 1, 6, 4)
    inputs = torch.randn(4, 4)
    indices = torch.tensor([0, -1, 1, -1])
    before = torch.randn(3, 6)

    expected = before.clone()
    unmended("bgmv_expand")(inputs, weights, expected, indices.clamp(min=0), add_inputs)
    mended = before.clone()
    skipping_unset(unmended("bgmv_expand"))(inputs, weights, mended, indices, add_inputs)
    assert torch.equal(mended[1], before[1])  # the base token: untouched
    assert torch.equal(mended[[0, 2]], expected[[0, 2]]) and not torch.equal(mended[0], before[0])

    only_cut_off = torch.tensor([0, 1, 1, -1])  # the one base token is past the output's rows: nothing to keep
    expected, mended = before.clone(), before.clone()
    unmended("bgmv_expand")(inputs, weights, expected, only_cut_off.clamp(min=0), add_inputs)
    skipping_unset(unmended("bgmv_expand"))(inputs, weights, mended, only_cut_off, add_inputs)
    assert torch.equal(mended, expected)

    broadcast = before.clone()  # one base token's index over every row (vLLM's limit = 1): every row untouched
    skipping_unset(unmended("bgmv_expand"))(inputs[:1], weights, broadcast, indices[1:2], add_inputs)
    assert torch.equal(broadcast, before)


def test_a_check_that_raises_leaves_vllm_running_and_says_the_mend_was_not_applied(monkeypatch):
    """vLLM runs its plugins without a try: an error in the check would stop every vLLM process in the environment.
    It is told on vLLM's log instead, and vLLM starts unmended."""
    import logging

    def broken(*args, **kwargs):
        raise RuntimeError("an op that changed its signature")

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    monkeypatch.setattr(lora_ops, "bgmv_shrink", broken)
    handler = Keep(logging.WARNING)
    logging.getLogger("vllm.reflectagent").addHandler(handler)
    try:
        register()
    finally:
        logging.getLogger("vllm.reflectagent").removeHandler(handler)
    assert lora_ops.bgmv_shrink is broken  # nothing was changed
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    told = records[0].getMessage()
    assert "not applied" in told and "RuntimeError: an op that changed its signature" in told
