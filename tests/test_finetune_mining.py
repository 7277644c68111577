"""Hard examples mined from the judgment cache (``finetune data --from-cache``): the judge's own order-inconsistent or
low-margin judgments of labelled pairs become STaR and STaR-DPO rows, read through a cache-only view that makes no
LM call. Fake engine and made-up judgments for the rules; the embedded vLLM server for a real program's steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dspy
import pytest

from fakes import ThreadEngine, fake_api_backend
from reflectagent.backends import resolve_backend
from reflectagent.cache import CacheOnly, JudgmentCache, NotCached, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.finetune import DataConfig, build_mined_data, mine_cache
from reflectagent.finetune.mining import Mined, Mining, doubts
from reflectagent.judge import judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import named_program
from reflectagent.results import Analysis, Judgment
from reflectagent.splits import split_pairs

RIGHT = Pair(
    id="worded",
    prompt="Which answer is better?",
    response_a="This one is right, clearly.",
    response_b="This one is wrong.",
    label="A",
)
LEANING = Pair(
    id="plain", prompt="Capital of France?", response_a="Paris is the capital.", response_b="Lyon is.", label="A"
)
UNSEEN = Pair(id="unseen", prompt="Capital of Spain?", response_a="Madrid.", response_b="Seville.", label="A")
TEXT = "The first response names the right city and explains why."


def analysis(preference, swapped, text=TEXT, probability=None):
    return Analysis(text=text, preference=preference, swapped=swapped, parsed=True, raw="", probability=probability)


def test_a_doubt_is_orders_leaning_apart_or_a_probability_near_a_half():
    agree = Judgment(preference="A", analyses=(analysis("A", False), analysis("A", True)), probability_a=0.9)
    assert doubts(agree) == ()
    assert doubts(Judgment(preference="A", analyses=agree.analyses, probability_a=0.55)) == ("low_margin",)
    assert doubts(Judgment(preference="A", analyses=agree.analyses, probability_a=0.55), margin=0.02) == ()
    split = Judgment(preference=None, analyses=(analysis("A", False), analysis("B", True)), probability_a=0.5)
    assert doubts(split) == ("order_inconsistent", "low_margin")
    assert doubts(Judgment(preference="A", analyses=(analysis("A", False),))) == ()  # one order: nothing to compare


def test_mined_rows_are_star_and_star_dpo_and_say_where_they_came_from():
    two_each = (
        analysis("A", False),
        analysis("B", False, "The second response is better written and more polite."),
        analysis("A", True, "Shown second, the right city still wins on the facts."),
        analysis("B", True),
    )
    pair = Pair(id="p1", prompt="Capital of France?", response_a="Paris.", response_b="Lyon.", label="A")
    mining = Mining(
        (Mined(pair, Judgment(preference=None, analyses=two_each), ("order_inconsistent",)),),
        confident=3,
        not_cached=2,
        unlabelled=1,
        margin=0.1,
    )
    built = build_mined_data(mining, DataConfig(fractions="1,0,0", ratio=None))
    rows, dpo = built.splits["train"], built.dpo["train"]
    assert [r["kind"] for r in rows] == ["response", "response"] and {r["order"] for r in rows} == {"AB", "BA"}
    assert len(dpo) == 2 and all(r["from_cache"] and r["doubt"] == ["order_inconsistent"] for r in rows + dpo)
    assert not any(r["rationalized"] for r in rows)  # a rationalised row would have called the teacher
    assert (
        built.stats["pairs_confident"] == 3
        and built.stats["pairs_not_cached"] == 2
        and built.stats["pairs_order_inconsistent"] == 1
    )


def test_mining_rebuilds_judgments_from_the_cache_and_calls_no_lm(tmp_path):
    """The fake engine names the first position unless "wrong" comes before "right": the worded pair is judged the
    same in both orders, the plain one by position (its two orders disagree)."""
    cache = JudgmentCache(tmp_path / "cache")
    program = named_program("genrm-both")
    with ThreadEngine(delay_s=0) as engine:
        os.environ.setdefault("FAKE_KEY", "k")
        settings = Settings(backends={"api": fake_api_backend(engine.api_base)})
        lm = resolve_backend("api", settings)
        with use_cache(cache), dspy.context(lm=lm):
            judged = judge_pairs(program, [RIGHT, LEANING], progress=False)
        made, entries = len(engine.calls), len(cache)
        mining = mine_cache([RIGHT, LEANING, UNSEEN], program, lm, cache)
        assert len(engine.calls) == made == 4 and len(cache) == entries  # no call, nothing written
    assert (mining.confident, mining.not_cached, [m.pair.id for m in mining.mined]) == (1, 1, ["plain"])
    assert mining.mined[0].judgment.preference == judged[1].preference is None
    assert mining.mined[0].doubts == ("order_inconsistent",) and all(
        a.cached for a in mining.mined[0].judgment.analyses
    )
    with use_cache(CacheOnly(cache)), dspy.context(lm=lm), pytest.raises(NotCached):
        program.judge(UNSEEN)


def test_the_command_mines_a_train_split_with_the_backend_gone_and_refuses_the_test_split(tmp_path):
    pairs = [
        Pair(
            id=f"p{i}",
            prompt=f"Question {i}?",
            response_a=f"Answer {i}, which is good.",
            response_b=f"Answer {i}b.",
            label="A",
            source="s",
        )
        for i in range(10)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs))
    train = split_pairs(pairs, seed=0)["train"]
    config = tmp_path / "c.toml"
    with ThreadEngine(delay_s=0) as engine:
        config.write_text(
            f'[backends.api]\nmodel = "openai/fake"\napi_base = "{engine.api_base}"\napi_key_env = "FAKE_KEY"\n'
            "constrained = false\nlogprobs = false\nnum_retries = 0\n"
        )
        lm = resolve_backend(
            "api",
            Settings.model_validate(
                {
                    "backends": {
                        "api": {
                            "model": "openai/fake",
                            "api_base": engine.api_base,
                            "api_key_env": "FAKE_KEY",
                            "constrained": False,
                            "logprobs": False,
                            "num_retries": 0,
                        }
                    }
                }
            ),
        )
        with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=lm):
            judge_pairs(named_program("genrm-both"), train, progress=False)
    env = {**os.environ, "FAKE_KEY": "k"}  # the engine is gone: any LM call would fail the command

    def command(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "reflectagent.cli",
                "finetune",
                "data",
                "--data",
                str(data),
                "--from-cache",
                "-p",
                "genrm-both",
                "-b",
                "api",
                "--config",
                str(config),
                "--cache-dir",
                str(tmp_path / "cache"),
                "-o",
                str(tmp_path / "out"),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )

    refused = command("--split", "test")
    assert refused.returncode == 2 and "measured on" in refused.stderr
    done = command("--split", "train", "--fractions", "1,0,0")
    assert done.returncode == 0, done.stderr
    card = json.loads((tmp_path / "out" / "data_card.json").read_text())
    assert card["pairs_order_inconsistent"] == len(train) and card["pairs_not_cached"] == 0
    assert card["mined_program"] == "genrm-both" and card["mined_backend"] == "api"
    import datasets

    rows = datasets.load_from_disk(str(tmp_path / "out" / "unified"))["train"]
    assert len(rows) == len(train) and set(rows["from_cache"]) == {True} and rows["doubt"][0] == ["order_inconsistent"]


@pytest.mark.server
def test_a_real_programs_cached_judgments_are_mined_as_they_were_made(server, cache, sample_pairs):
    settings = Settings(backends={"embedded": BackendConfig(model="embedded", context_chars=4000)})
    lm, program, pairs = resolve_backend("embedded", settings), named_program("genrm-prob"), sample_pairs[:2]
    with dspy.context(lm=lm):
        judged = judge_pairs(program, pairs, progress=False)
    entries = len(cache)
    mining = mine_cache(
        pairs + sample_pairs[2:3], program, lm, cache, margin=0.5
    )  # every judgment with a P(A) is in doubt
    assert len(cache) == entries and mining.not_cached == 1
    found = {m.pair.id: m for m in mining.mined}
    for pair, judgment in zip(pairs, judged):
        if judgment.probability_a is not None:
            again = found[pair.id].judgment
            assert (again.preference, again.probability_a) == (
                judgment.preference,
                pytest.approx(judgment.probability_a),
            )
            assert "low_margin" in found[pair.id].doubts and all(a.cached for a in again.analyses)
