"""Every program end to end on the real embedded vLLM server, and a compiled program reloaded."""

import json
import subprocess
import sys

import pytest

from reflectagent.backends import backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.judge import judge_pairs
from reflectagent.programs import AdaptiveReflectRM, Ensemble, GenRM, ReflectRM, rank
from reflectagent.programs.compile import compile_judge
from test_embedded_server import settings

pytestmark = pytest.mark.server


def conf(lora_dir=None):
    return settings(lora_dir=lora_dir)


def test_the_async_path_gives_the_sync_path_s_judgments_over_real_http(server, sample_pairs):
    """Both paths make their own calls (no cache) to a real server and read a verdict probability from each.

    vLLM does not promise the same numbers for a request batched with different others, and the two paths'
    requests arrive with different timing: a greedy analysis that forks at a near-tie token ends elsewhere
    (CI saw P(A) 0.52 against 0.31 for one pair). So where both paths wrote the same analyses, the verdict
    probabilities must agree to within the served dtype's rounding; exact sameness of the two paths is
    tested with deterministic fakes. SmolLM2 is served in bfloat16, whose logits near 10 to 30 are rounded
    to steps of 1/16 to 1/8 nat: one step in the A-B gap moves a P(A) near 0.5 by up to 0.03 (CI saw 0.474
    against 0.451 with the same analyses). On a small CPU the engine now computes on two threads
    (``reflectagent.server.RESERVE_A_CORE_FROM``), whose split of each product depends on the batch, so the
    rounding can land a step further (CI saw 0.477 against 0.520): agreement means within 0.07, two steps.
    """
    import asyncio

    from reflectagent.judge import ajudge_pairs

    pairs = sample_pairs[:4]
    program = GenRM(both_orders=True, decision="probability")
    with use_cache(JudgmentCache(enabled=False)), backend("embedded", conf()):
        synced = judge_pairs(program, pairs, progress=False)
        awaited = asyncio.run(ajudge_pairs(program, pairs, progress=False))
    assert all(
        j.probability_a is not None and j.lm_calls == 2 and all(a.parsed for a in j.analyses) for j in synced + awaited
    )
    same = [(a, b) for a, b in zip(synced, awaited) if [x.text for x in a.analyses] == [x.text for x in b.analyses]]
    assert [a.probability_a for a, _ in same] == pytest.approx([b.probability_a for _, b in same], abs=0.07), (
        f"{len(same)} of {len(pairs)} pairs had the same analyses on both paths"
    )


def test_genrm_and_reflectrm_judge_real_pairs(server, cache, sample_pairs):
    pairs = sample_pairs[:4]
    with backend("embedded", conf()):
        one = judge_pairs(GenRM(), pairs, progress=False)
        both = judge_pairs(GenRM(both_orders=True, decision="probability"), pairs, progress=False)
        full = judge_pairs(ReflectRM(), pairs, progress=False)
        adaptive = judge_pairs(AdaptiveReflectRM(), pairs, progress=False)
    for j in one:
        assert len(j.analyses) == 1 and j.analyses[0].parsed and j.preference == j.analyses[0].preference
    for j in both:
        assert j.probability_a is not None
        if j.probability_a == 0.5:  # a perfectly position-biased model: exactly even, and said so
            assert j.preference is None and j.reason == "tied probability"
        else:
            assert j.preference == ("A" if j.probability_a > 0.5 else "B")
        assert j.cache_hits == 1  # the first-order analysis is shared with GenRM(one order)
    for j in full:
        assert len(j.analyses) == 2 and len(j.reflections) == 2
        assert j.cache_hits == 2  # stage 1 is GenRM's both-orders analyses, already cached
        assert all(r.parsed for r in j.reflections)
        if j.preference is not None:
            assert j.preference == j.analyses[j.chosen].preference
        else:
            assert j.reason == "reflection tie"
    assert [j.preference for j in adaptive] == [j.preference for j in full]
    assert sum(j.lm_calls for j in adaptive) == 0  # same samples, same reflections: all cached
    for a, f in zip(adaptive, full):
        assert len(a.reflections) == (0 if len({x.preference for x in f.analyses}) == 1 else 2)


def test_ranking_and_an_ensemble_across_two_backends(server, cache, lora_dir):
    with backend("embedded", conf(lora_dir)):
        ranking = rank(
            GenRM(both_orders=True, decision="probability"),
            "Name a primary colour.",
            ["Red.", "Banana.", "Blue is one."],
        )
        ensemble = Ensemble([(GenRM(), "embedded"), (GenRM(), "tuned"), (GenRM(both_orders=True), None)])
        judged = ensemble(prompt="2+2?", response_a="4", response_b="5")
    assert sorted(ranking.order) == [0, 1, 2] and len(ranking.comparisons) == 3 and ranking.usage.lm_calls == 6
    assert len(judged.parts) == 3 and judged.lm_calls == 3 and judged.cache_hits == 1
    assert judged.parts[1].analyses[0].cached is False  # the adapter's step is its own
    # the two base members share their first step: made once, by whichever member ran first (they run concurrently)
    assert sorted(judged.parts[i].analyses[0].cached for i in (0, 2)) == [False, True]


def test_compiled_program_saves_reloads_and_reproduces(server, tmp_path, sample_pairs):
    train, dev = sample_pairs[16:24], sample_pairs[24:28]
    store = JudgmentCache(tmp_path / "cache")
    with use_cache(store), backend("embedded", conf()):
        compiled = compile_judge(GenRM(), train, "bootstrap", max_demos=2)
        original = judge_pairs(compiled, dev, progress=False)
    store.close()
    assert len(compiled.analyzer.predict.demos) >= 1
    path = compiled.save(tmp_path / "genrm.json")

    code = f"""
import json, sys
from reflectagent.backends import backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import load_program
pairs = [Pair(**p) for p in json.loads(sys.stdin.read())]
settings = Settings(backends={{"embedded": BackendConfig(model="embedded", context_chars=4000)}})
with use_cache(JudgmentCache({str(tmp_path / "cache")!r})), backend("embedded", settings):
    judged = judge_pairs(load_program({str(path)!r}), pairs, progress=False)
print(json.dumps([[j.preference, j.lm_calls, j.cache_hits] for j in judged]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([p.to_dict() for p in dev]),
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ},
    ).stdout
    reloaded = json.loads(out.strip().splitlines()[-1])
    # Same prompts, demos and instructions: every step is found in the cache, with the same verdicts.
    assert reloaded == [[j.preference, 0, 1] for j in original]
