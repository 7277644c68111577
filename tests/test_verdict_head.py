"""The verdict head: features at the verdict slot, a logistic fit with the base as offset, folded into two LM-head rows."""

import numpy as np
import pytest
import torch

from reflectagent.finetune.verdict_head import (
    VERDICT_PREFIX,
    before_verdict,
    FeatureStore,
    VerdictRow,
    extract,
    fit_head,
    verdict_direction,
    verdict_rows,
    write_head,
)
from reflectagent.models import DONE_MARKER
from reflectagent.pairs import Pair


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A real (random) Qwen2 model with an untied head and the embedded model's tokenizer: small enough to run here."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from reflectagent.models import prepare_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_model("embedded"))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def pairs(n: int) -> list[Pair]:
    return [
        Pair(
            prompt=f"question {i}",
            response_a=f"answer {i} one",
            response_b=f"answer {i} two",
            label="AB"[i % 2],
            id=f"p{i}",
        )
        for i in range(n)
    ]


def test_rows_end_where_the_served_model_writes_its_verdict_and_label_the_shown_order(tiny_model):
    _, tokenizer = tiny_model
    rows = verdict_rows(pairs(2), tokenizer, None, orders="both")
    assert [(r.pair_id, r.swapped, r.label) for r in rows] == [
        ("p0", False, 1.0),
        ("p0", True, 0.0),
        ("p1", False, 0.0),
        ("p1", True, 1.0),
    ]
    assert tokenizer.decode(rows[0].token_ids).endswith(VERDICT_PREFIX)
    assert "answer 0 two" in tokenizer.decode(rows[1].token_ids).split("response_a")[-1]  # swapped: B shown first
    one = verdict_rows(pairs(40), tokenizer, None, orders="one")
    assert len(one) == 40 and 10 < sum(r.swapped for r in one) < 30  # one order each, drawn per pair


def test_after_an_analysis_rows_end_at_the_verdict_the_model_wrote_and_skip_one_without(tiny_model):
    """genrm-prob's verdict slot: the Analyze request, then the model's own output up to the letter."""
    _, tokenizer = tiny_model
    two = pairs(2)
    quoted = '{"analysis":"B wrote \\"preference\\":\\"A\\" in its answer","preference":"B"}'
    analyses = {
        ("p0", False): quoted,
        ("p0", True): '{"analysis":"short","preference":"A"}',
        ("p1", False): '{"analysis":"cut off before the verdict',  # no verdict: no row
    }
    rows = verdict_rows(two, tokenizer, None, orders="both", analyses=analyses)
    assert [(r.pair_id, r.swapped) for r in rows] == [("p0", False), ("p0", True)]
    first = tokenizer.decode(rows[0].token_ids)
    assert first.endswith('"analysis":"B wrote \\"preference\\":\\"A\\" in its answer","preference":"')
    assert "response_a" in first and "analysis" in first.split("assistant")[0]  # the Analyze signature's request
    assert rows[1].label == 0.0  # p0 is labelled A; shown swapped, the better one is second
    assert before_verdict(quoted).endswith('answer","preference":"')
    for unfinished in (
        '{"analysis":"x","preference":"',
        '{"analysis":"x","preference":"A',
        '{"analysis":"x","preference":"Ab"}',
    ):
        assert before_verdict(unfinished) is None
    assert before_verdict(None) is None


def test_features_are_the_final_hidden_state_and_survive_a_restart(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, tokenizer = tiny_model
    rows = verdict_rows(pairs(3), tokenizer, None)
    store = FeatureStore(tmp_path / "features")
    extract(folder, rows, store, dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        expected = model.model(input_ids=torch.tensor([rows[2].token_ids])).last_hidden_state[0, -1].numpy()
    reopened = FeatureStore(tmp_path / "features")
    assert len(reopened) == 6
    np.testing.assert_allclose(reopened.get([rows[2].key])[0], expected, atol=1e-2)  # stored in float16


def test_the_fit_learns_a_planted_direction_and_the_l2_pull_keeps_the_base():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8))
    base, planted = np.zeros(8), np.array([2.0, -1.0, 0, 0, 0, 0, 0, 0])
    y = (rng.random(2000) < 1 / (1 + np.exp(-x @ planted))).astype(float)
    head = fit_head(x, base, y, l2=1e-6)
    np.testing.assert_allclose(head.delta, planted, atol=0.25)
    assert np.abs(fit_head(x, base, y, l2=100.0).delta).max() < 0.01
    # the base is an offset: a base that already knows the answer needs no change
    alone, on_base = fit_head(x, base, y, l2=1e-3).delta, fit_head(x, planted, y, l2=1e-3).delta
    assert np.linalg.norm(on_base) < 0.2 * np.linalg.norm(alone)  # what is left is sampling noise


def test_the_head_folded_into_the_model_moves_exactly_the_verdict_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from reflectagent.finetune.verdict_head import VerdictHead

    folder, tokenizer = tiny_model
    row = verdict_rows(pairs(1), tokenizer, None)[0]
    delta = np.linspace(-1, 1, 32).astype(np.float32)
    out = write_head(
        folder, VerdictHead(delta=delta, l2=0.0, train_rows=0, train_loss=0.0), tmp_path / "headed", {"name": "test"}
    )
    assert (out / DONE_MARKER).exists()
    before = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([row.token_ids])
    with torch.inference_mode():
        h = before.model(input_ids=ids).last_hidden_state[0, -1].numpy()
        old, new = before(input_ids=ids).logits[0, -1].numpy(), after(input_ids=ids).logits[0, -1].numpy()
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("A", "B"))
    assert np.isclose((new[a] - new[b]) - (old[a] - old[b]), h @ delta, atol=1e-4)
    others = np.ones(len(old), bool)
    others[[a, b]] = False
    np.testing.assert_array_equal(new[others], old[others])
    np.testing.assert_allclose(
        verdict_direction(out, tokenizer) - verdict_direction(folder, tokenizer), delta, atol=1e-5
    )


def test_a_tied_head_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from reflectagent.finetune.verdict_head import VerdictHead
    from reflectagent.models import prepare_model

    embedded = prepare_model("embedded")  # SmolLM2 ties its head to its input embeddings
    with pytest.raises(ValueError, match="ties its LM head"):
        write_head(embedded, VerdictHead(np.zeros(576, np.float32), 0.0, 0, 0.0), tmp_path / "x", {})
    with pytest.raises(ValueError, match="no separate lm_head"):
        verdict_direction(embedded, AutoTokenizer.from_pretrained(embedded))
    assert not (tmp_path / "x").exists()


def test_rows_key_on_what_the_model_reads():
    assert VerdictRow("p", False, (1, 2, 3), 1.0).key == VerdictRow("q", True, (1, 2, 3), 0.0).key
    assert VerdictRow("p", False, (1, 2, 3), 1.0).key != VerdictRow("p", False, (1, 2, 4), 1.0).key


def test_a_half_written_shard_is_ignored_and_two_writers_keep_both_shards(tmp_path):
    first, second = FeatureStore(tmp_path), FeatureStore(tmp_path)  # two extractions into one folder
    first.add(["a", "b"], np.ones((2, 4)))
    second.add(["c"], np.zeros((1, 4)))
    np.savez(tmp_path / "shard-cut.partial.npz", keys=np.asarray(["d"]), features=np.ones((1, 4)))
    reopened = FeatureStore(tmp_path)
    assert len(reopened) == 3 and "d" not in reopened
    np.testing.assert_array_equal(reopened.get(["a", "c"]), [[1, 1, 1, 1], [0, 0, 0, 0]])
