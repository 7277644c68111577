"""The fine-tuning loop: its config file, its pair choice, and a tiny real run end to end
(teacher traces on the real server, three real trainings, a served adapter, the report)."""

import json
from pathlib import Path

import pytest

from reflectagent.config import BackendConfig, ConfigError, Settings
from reflectagent.finetune.loop import Loop
from reflectagent.finetune.selection import choose_pairs, longer_wins, one_per_prompt, one_per_prompt_length_balanced
from reflectagent.finetune.loop_config import LoopConfig, load_loop_config
from reflectagent.pairs import Pair

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")


def test_config_file_sections_and_clear_errors(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("train_pairs: 12\nsft:\n  max_steps: 3\n  lora_r: 4\ndata:\n  ratio: 2.0\n")
    config = load_loop_config(path, output_dir=str(tmp_path / "out"))
    assert (config.train_pairs, config.sft.max_steps, config.sft.lora_r, config.data.ratio) == (12, 3, 4, 2.0)
    assert (
        config.sft.learning_rate == 3e-4 and config.data.fractions == "0.9,0.1,0"
    )  # untouched keys keep the loop's defaults
    path.write_text("train_pairs: 12\nsft:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="max_step"):
        load_loop_config(path)
    path.write_text("trian_pairs: 12\n")
    with pytest.raises(ConfigError, match="trian_pairs"):
        load_loop_config(path)
    path.write_text("serve: docker\n")
    with pytest.raises(ConfigError, match="serve"):
        load_loop_config(path)
    assert load_loop_config(ROOT / "examples" / "loop.yaml") == LoopConfig()  # the documented file is the defaults
    assert load_loop_config(ROOT / "examples" / "loop-gpu.yaml").sft.max_length == 8192


@needs_shared
def test_default_data_is_found_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = LoopConfig()
    assert all(Path(f).is_file() for f in config.files("train_data") + config.files("unseen_data"))
    given = load_loop_config(None, train_data="../data.jsonl")  # a path given relative to where the command runs
    assert given.files("train_data") == [str(tmp_path.parent / "data.jsonl")]
    assert load_loop_config(ROOT / "examples" / "loop.yaml") == config  # the documented file, from anywhere


def test_default_data_is_in_the_data_folder_setting_and_named_files_need_none(tmp_path, monkeypatch):
    from reflectagent import paths

    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path))
    assert LoopConfig().files("unseen_data") == [
        str(tmp_path / "pandalm.jsonl"),
        str(tmp_path / "autoj_pairwise.jsonl"),
    ]
    monkeypatch.delenv(paths.DATA_DIR_ENV)
    monkeypatch.setattr(paths, "source_checkout", lambda: None)  # an ordinary install: no default folder
    with pytest.raises(paths.DataDirError, match="REFLECTAGENT_DATA_DIR"):
        load_loop_config(None)
    named = load_loop_config(None, train_data="a.jsonl", unseen_data="b.jsonl")
    assert named.files("unseen_data") == [str(Path("b.jsonl").resolve())] and named.sft.max_steps == 30


@needs_shared
def test_pairs_are_disjoint_balanced_and_short_enough():
    config = load_loop_config(
        None,
        train_data=f"{SHARED}/hhh_alignment.jsonl,{SHARED}/hh_rlhf_harmless_test.jsonl",
        unseen_data=f"{SHARED}/pandalm.jsonl",
        train_pairs=40,
        dev_pairs=20,
        unseen_pairs=10,
        max_pair_chars=1200,
    )
    chosen = choose_pairs(config)
    assert [len(chosen[k]) for k in ("dev", "unseen")] == [20, 10]
    held_out = {p.prompt for p in chosen["dev"] + chosen["unseen"]}
    assert not any(p.prompt in held_out for p in chosen["train"])  # HHH pairs one prompt with several responses
    assert 30 <= len(chosen["train"]) <= 40
    ids = [p.id for k in chosen for p in chosen[k]]
    assert len(ids) == len(set(ids))
    sources = [p.source for p in chosen["train"] + chosen["dev"]]
    assert abs(sources.count(sources[0]) - len(sources) / 2) <= 2  # balanced over the two training sources
    assert {p.source for p in chosen["unseen"]} == {"pandalm_testset_v1"}
    for pair in chosen["train"] + chosen["dev"] + chosen["unseen"]:
        assert pair.label in ("A", "B") and len(pair.prompt + pair.response_a + pair.response_b) <= 1200
    assert choose_pairs(config) == chosen  # stable


def test_one_pair_a_prompt_balanced_so_that_length_does_not_predict_the_label():
    """Most prompts offer only longer-wins pairs (as the teacher file does): the balanced choice takes a shorter-wins
    pair from every prompt that has one, until the two kinds are even; the plain choice leaves the bias in."""

    def pair(prompt: int, k: int, longer_is_better: bool) -> Pair:
        short, long = f"short {k}", f"a much longer answer {k}"
        return Pair(
            prompt=f"q{prompt}",
            response_a=long,
            response_b=short,
            id=f"p{prompt}-{k}",
            label="AB"[not longer_is_better],
        )

    pairs = [pair(q, k, True) for q in range(40) for k in range(3)]  # every prompt: longer wins
    pairs += [pair(q, 9, False) for q in range(0, 40, 2)]  # half the prompts also have a shorter-wins pair
    pairs.append(Pair(prompt="q99", response_a="same", response_b="emas", id="tie-length", label="A"))
    plain, even = one_per_prompt(pairs, 0), one_per_prompt_length_balanced(pairs, 0)
    assert len(plain) == len(even) == 41 and len({p.prompt for p in even}) == 41
    kinds = [longer_wins(p) for p in even]
    assert kinds.count(False) == kinds.count(True) == 20 and kinds.count(None) == 1
    assert [longer_wins(p) for p in plain].count(False) < 15  # a prompt's first pair is usually longer-wins
    fewer = one_per_prompt_length_balanced([p for p in pairs if p.id != "p0-9"], 0)
    assert [longer_wins(p) for p in fewer].count(False) == 19  # as even as the prompts allow
    assert one_per_prompt_length_balanced(list(reversed(pairs)), 0) == even  # stable, whatever the input order


@needs_shared
@pytest.mark.server
@pytest.mark.torch
def test_tiny_loop_runs_end_to_end_and_resumes(server, tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
train_data: {SHARED}/hhh_alignment.jsonl
unseen_data: {SHARED}/pandalm.jsonl
max_pair_chars: 900
train_pairs: 8
dev_pairs: 3
unseen_pairs: 3
samples: 2
serve: lora
programs: genrm-both
unconstrained: base
sft: {{max_steps: 3, per_device_batch: 2, gradient_accumulation: 1, lora_r: 8, lora_alpha: 16, save_steps: 2,
       logging_steps: 1, max_length: 1024, threads: 2}}
reward: {{max_steps: 2, per_device_batch: 2, gradient_accumulation: 1, logging_steps: 1, max_length: 512, threads: 2}}
""")
    config = load_loop_config(path)
    teacher = Settings(
        backends={"embedded": BackendConfig(model="embedded", api_base=server.url, temperature=0.8, context_chars=4000)}
    )
    from reflectagent.cache import JudgmentCache, use_cache

    with use_cache(JudgmentCache(tmp_path / "cache")):
        report = Loop(config, teacher, progress=False).run()
        out = tmp_path / "run"
        card = json.loads((out / "data" / "data_card.json").read_text())
        assert card["pairs"]["train"] >= 6 and card["rows"]["train"].get("response", 0) > 0
        traces = [json.loads(line) for line in (out / "data" / "traces.jsonl").read_text().splitlines()]
        assert len(traces) == 8 and all(
            len(t["analysis_correct"]) == len(t["judgment"]["analyses"]) == 2 for t in traces
        )
        response = json.loads((out / "models" / "response" / "run_card.json").read_text())
        unified = json.loads((out / "models" / "unified" / "run_card.json").read_text())
        assert response["rows_by_kind"].keys() == {"response"} and response["steps"] == 3
        assert unified["rows_by_kind"]["response"] == response["rows_by_kind"]["response"]  # same response rows
        assert (out / "models" / "bradley-terry" / "adapter").is_dir()
        summary = json.loads((out / "summary.json").read_text())
        for split in ("dev", "unseen"):
            rows = {(r["backend"], r["program"]): r for r in summary["results"][split]}
            assert set(rows) == {
                ("base", "genrm-both"),
                ("base (free)", "genrm-both"),
                ("response", "genrm-both"),
                ("unified", "genrm-both"),
                ("bradley-terry", "bradley-terry"),
            }
            assert rows[("bradley-terry", "bradley-terry")]["consistency"] == 1.0
            assert rows[("unified", "genrm-both")]["parse failures"] is not None
        text = report.read_text()
        assert "| unified | genrm-both |" in text and "train unified" in text
        assert (out / "eval" / "dev" / "report.md").exists() and (out / "eval" / "unseen" / "plots").is_dir()
        stages = json.loads((out / "stages.json").read_text())
        assert {"traces+data", "train response", "train unified", "train bradley-terry", "eval"} <= set(stages)

        # Run again: every stage is found done, every step comes from the cache, the report is the same.
        before = (out / "models" / "unified" / "run_card.json").read_text()
        again = Loop(config, teacher, progress=False).run()
        assert (out / "models" / "unified" / "run_card.json").read_text() == before
        assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
        assert again == report
