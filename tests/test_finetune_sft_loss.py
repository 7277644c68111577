"""Off GPU the SFT job's loss is transformers' own, and it is the very loss TRL's fused LM head computes."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import SFTConfig, SFTTrainer

from reflectagent.finetune.sft_trainer import sft_trainer

pytestmark = pytest.mark.torch


def test_off_gpu_the_loss_skips_trls_fused_head_and_equals_it(model_dir, sample_pairs, tmp_path, monkeypatch):
    rows = [{"prompt": [{"role": "user", "content": pair.prompt}],
             "completion": [{"role": "assistant", "content": f"Response {pair.label} answers what was asked."}]}
            for pair in sample_pairs[:2]]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, bf16=False, report_to=[], use_cpu=True,
                     max_length=1024)
    trainer = sft_trainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                          train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # the prompt is masked, the target is not

    plain_calls = []
    plain_loss = Trainer.compute_loss
    monkeypatch.setattr(Trainer, "compute_loss", lambda *a, **k: plain_calls.append(1) or plain_loss(*a, **k))
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        trls = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert plain_calls == [1]  # ours went through transformers' loss; TRL's own path did not
    torch.testing.assert_close(ours, trls, rtol=1e-4, atol=1e-4)
