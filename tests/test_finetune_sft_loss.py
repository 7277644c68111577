"""Off GPU the SFT job's loss is transformers' own, and it is the very loss TRL's fused LM head computes."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import SFTConfig, SFTTrainer

from reflectagent.finetune.sft_trainer import sft_trainer

pytestmark = pytest.mark.torch


def test_off_gpu_the_loss_skips_trls_fused_head_and_equals_it(model_dir, sample_pairs, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": pair.prompt}],
            "completion": [{"role": "assistant", "content": f"Response {pair.label} answers what was asked."}],
        }
        for pair in sample_pairs[:2]
    ]
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, bf16=False, report_to=[], use_cpu=True, max_length=1024
    )
    trainer = sft_trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["labels"] == -100).any() and (
        batch["labels"] != -100
    ).any()  # the prompt is masked, the target is not

    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        plain = Trainer.compute_loss(trainer, trainer.model, dict(batch))  # transformers' loss over every position
        trls = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
        ours_sum = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(7))
        _, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, trls, rtol=1e-4, atol=1e-4)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours_sum, ours * targets / 7, rtol=1e-4, atol=1e-4)  # summed, over the given count
    first = int((batch["labels"] != -100).any(dim=0).nonzero()[0])
    assert (
        outputs.logits.shape[1] == batch["labels"].shape[1] - first + 1 < batch["labels"].shape[1]
    )  # no head over the prompt


def test_the_head_on_targets_only_gives_the_same_gradients(model_dir, sample_pairs, tmp_path):
    from reflectagent.finetune.sft_trainer import completion_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [
        tokenizer(pair.prompt + " Verdict: " + pair.label, return_tensors="pt")["input_ids"][0]
        for pair in sample_pairs[:4]
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((4, width), tokenizer.pad_token_id or 0)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):  # right-padded, targets (the last 2 tokens) ending at different places; row 3 has none
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
        if i < 3:
            labels[i, len(r) - 2 : len(r)] = r[-2:]
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    grads = []
    for loss_of in (lambda: completion_loss(model, dict(inputs))[0], lambda: model(**inputs).loss):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-6)
    with torch.no_grad():  # a batch with no target at all adds nothing, where a mean would be NaN
        nothing = completion_loss(model, {**inputs, "labels": torch.full_like(labels, -100)})[0]
    assert float(nothing) == 0.0
