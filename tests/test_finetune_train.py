"""A tiny real LoRA run on the embedded model: the loss falls, vLLM serves the adapter, a program uses it."""

import json

import pytest

from reflectagent.backends import backend
from reflectagent.config import BackendConfig, Settings
from reflectagent.finetune.data import DataConfig, Trace, build_unified_data
from reflectagent.finetune.sft_config import SFTJobConfig
from reflectagent.finetune.sft_trainer import train_sft
from reflectagent.programs import GenRM
from reflectagent.results import Analysis, Judgment, flip
from reflectagent.server import ServerSpec, VLLMServer

pytestmark = [pytest.mark.server, pytest.mark.torch]


def traces_for(pairs):
    """Hand-written teacher traces: one right analysis per order, naming the labelled response."""
    out = []
    for pair in pairs:
        analyses = tuple(
            Analysis(
                text=f"Response {flip(pair.label) if swapped else pair.label} follows the request and is correct.",
                preference=pair.label,
                swapped=swapped,
                parsed=True,
                raw="",
            )
            for swapped in (False, True)
        )
        out.append(Trace(pair, Judgment(preference=pair.label, analyses=analyses)))
    return out


def test_tiny_lora_run_lowers_the_loss_and_is_served(model_dir, sample_pairs, tmp_path, cache):
    data = build_unified_data(traces_for(sample_pairs[:8]), DataConfig(ratio=None, fractions="1,0,0"))
    data.save(tmp_path / "data")
    config = SFTJobConfig(
        data=str(tmp_path / "data" / "unified"),
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_batch=4,
        gradient_accumulation=1,
        learning_rate=1e-3,
        max_length=896,
        logging_steps=1,
        save_steps=4,
        lora_r=8,
        lora_alpha=16,
        threads=2,
    )
    adapter = train_sft(config)
    card = json.loads((tmp_path / "run" / "run_card.json").read_text())
    assert card["steps"] == 8 and card["train_rows"] == 16 and card["dropped_too_long"] == 0
    assert card["final_loss"] < card["first_loss"] * 0.8, card
    assert (adapter / "adapter_config.json").exists() and (
        tmp_path / "run" / "training_curve.png"
    ).stat().st_size > 5000

    spec = ServerSpec(model_dir=str(model_dir), served_name="embedded", loras={"judge": str(adapter)}, max_lora_rank=8)
    with VLLMServer(spec, log_path=tmp_path / "vllm.log") as server:
        settings = Settings(
            backends={
                "tuned": BackendConfig(
                    model="embedded",
                    api_base=server.url,
                    lora={"judge": str(adapter)},
                    adapter="judge",
                    context_chars=4000,
                )
            }
        )
        with backend("tuned", settings) as lm:
            judgment = GenRM(both_orders=True).judge(sample_pairs[20])
    assert lm.model == "hosted_vllm/judge"
    assert all(a.parsed for a in judgment.analyses) and judgment.lm_calls == 2
