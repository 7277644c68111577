"""STaR-DPO on top of an SFT adapter, and merging an adapter into a full model folder (tiny real runs)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from reflectagent.finetune.data import DataConfig, Trace, build_unified_data
from reflectagent.finetune.dpo import DPOJobConfig, train_dpo
from reflectagent.finetune.export import merge_adapter
from reflectagent.results import Analysis, Judgment, flip

pytestmark = pytest.mark.torch


def traces_with_right_and_wrong(pairs):
    out = []
    for pair in pairs:
        analyses = []
        for swapped in (False, True):
            shown = flip(pair.label) if swapped else pair.label
            analyses += [
                Analysis(
                    text=f"Response {shown} answers what was asked, and correctly.",
                    preference=pair.label,
                    swapped=swapped,
                    parsed=True,
                    raw="",
                    sample=0,
                ),
                Analysis(
                    text=f"Response {flip(shown)} is shown first, so it must be better.",
                    preference=flip(pair.label),
                    swapped=swapped,
                    parsed=True,
                    raw="",
                    sample=1,
                ),
            ]
        out.append(Trace(pair, Judgment(preference=pair.label, analyses=tuple(analyses))))
    return out


def test_star_dpo_trains_on_top_of_sft_and_merges(model_dir, lora_dir, sample_pairs, tmp_path):
    data = build_unified_data(traces_with_right_and_wrong(sample_pairs[:4]), DataConfig(fractions="1,0,0"))
    data.save(tmp_path / "data")
    assert len(data.dpo["train"]) == 8  # 4 pairs x 2 orders, each a right and a wrong analysis of the same prompt
    job = DPOJobConfig(
        data=str(tmp_path / "data" / "dpo"),
        sft_adapter=str(lora_dir),
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_batch=4,
        gradient_accumulation=1,
        learning_rate=1e-3,
        lora_r=4,
        lora_alpha=8,
        logging_steps=1,
        max_length=768,
        threads=2,
    )
    merged = train_dpo(job)
    card = json.loads((tmp_path / "dpo" / "run_card.json").read_text())
    # two of the eight rows (both orders of the longest pair) exceed 768 tokens: left out and counted, not cut
    assert (
        card["steps"] == 2
        and card["train_rows"] == 6
        and card["dropped_too_long"] == 2
        and card["first_loss"] is not None
    )
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").exists()

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tuned = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[name], tuned.state_dict()[name])  # SFT (and DPO) folded in

    plain = merge_adapter(lora_dir, tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    assert not torch.equal(base.state_dict()[name], again.state_dict()[name])
    assert (plain / "tokenizer_config.json").exists() and not (plain / "adapter_config.json").exists()
