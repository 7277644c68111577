"""Calibration, abstains and escalation against the real embedded vLLM server (SmolLM2, verdict probabilities):
fitted on dev pairs, saved, served as a reward; the eval's ECE, reliability diagram and cost curve; the ladder
climbed for real, its shared steps charged once, its replays equal to runs; `reflectagent calibrate`."""

import json

import pytest
from typer.testing import CliRunner

from reflectagent.backends import backend, resolve_backend
from reflectagent.judge import judge_pairs
from reflectagent.programs import EscalatingJudge, load_program, named_program
from reflectagent.programs.calibration import calibrate
from reflectagent.programs.escalating import ladder, tune_escalation
from reflectagent.rl import Rewarder, trl_reward
from test_embedded_server import settings

pytestmark = pytest.mark.server


def test_a_program_calibrated_on_dev_pairs_is_saved_rewards_with_its_p_a_and_is_evaluated(
    server, cache, sample_pairs, tmp_path
):
    from reflectagent.eval import run_eval, write_report
    from reflectagent.eval.runner import EvalRun

    dev, test = sample_pairs[:8], sample_pairs[8:12]
    conf = settings()
    with backend("embedded", conf):
        calibrated = calibrate(
            named_program("direct-prob"), dev, "temperature", split="dev", data=["sample_pairs.jsonl"]
        )
        raw = judge_pairs(named_program("direct-prob"), test, progress=False)
    c = calibrated.calibration
    assert c.fitted_on["pairs"] == 8 and c.fitted_on["judgments"] == 16 and c.fitted_on["with_probability"] == 16
    assert 1e-3 <= c.slope < 1e3 and c.log_loss_before is not None and c.log_loss_after is not None
    path = calibrated.save(tmp_path / "direct-calibrated.json")
    assert json.loads(path.read_text())["options"]["calibration"]["fitted_on"]["split"] == "dev"

    lm = resolve_backend("embedded", conf)
    rewarder = Rewarder(str(path), lm=lm)  # what serve-rm --program PATH builds
    rewards = rewarder.rewards([p.prompt for p in test], [p.response_a for p in test], [p.response_b for p in test])
    assert [r.reward for r in rewards] == pytest.approx([c.apply(j.probability_a) for j in raw])
    assert all(not r.abstain for r in rewards) and sum(r.usage.lm_calls for r in rewards) == 0  # the same steps, cached
    trl = trl_reward(str(path), lm=lm, reference_column="reference")
    assert trl(
        [p.prompt for p in test], [p.response_a for p in test], reference=[p.response_b for p in test]
    ) == pytest.approx([r.reward for r in rewards])

    results = run_eval(
        test,
        [
            EvalRun("direct-prob", "embedded", named_program("direct-prob"), lm),
            EvalRun("direct-prob calibrated", "embedded", load_program(path), lm),
        ],
        progress=False,
    )
    folder = write_report(results, tmp_path / "report", {"data": ["sample"], "pairs": 4, "split": "test", "seed": 0})
    plain, fitted = results
    assert [r.verdicts for r in plain.records] == [
        r.verdicts for r in fitted.records
    ]  # temperature keeps every verdict
    assert plain.overall.calibration.n == fitted.overall.calibration.n == 8
    assert fitted.overall.calibration.ece != plain.overall.calibration.ece  # the same verdicts, other confidence
    assert (folder / "plots" / "reliability.png").stat().st_size > 5000
    report = json.loads((folder / "report.json").read_text())
    assert report["runs"][1]["overall"]["calibration"]["ece"] == pytest.approx(fitted.overall.calibration.ece)


def test_the_ladder_climbed_on_the_real_server_charges_shared_steps_once_and_replays_exactly(
    server, cache, sample_pairs, tmp_path
):
    from reflectagent.eval import run_eval, write_report
    from reflectagent.eval.report import curves

    pairs = sample_pairs[12:14]
    with backend("embedded", settings()):
        climbed = judge_pairs(EscalatingJudge(threshold=1.0), pairs, progress=False)  # every stage
        at_tenth = judge_pairs(named_program("escalating-prob:0.1"), pairs, progress=False)
        alone = judge_pairs(named_program("direct-prob"), pairs, progress=False)
        results = run_eval(
            pairs,
            ["direct-prob", "escalating-prob:0.05", "escalating-prob:0.3"],
            ["embedded"],
            settings=settings(),
            progress=False,
        )
    for j in climbed:
        assert [len(p.analyses) for p in j.parts] == [2, 2, 4, 2] and len(j.parts[3].reflections) == 2
        assert all(s.parsed for s in j.steps)  # constrained decoding
        assert j.cost.lm_calls == 8  # 2 + 2 + 2 new samples + 2 reflections: the shared analyses come from the cache
        assert j.decided_by == "reflection" or j.parts[3].preference is None
    for full, made, direct in zip(climbed, at_tenth, alone):
        assert made.lm_calls == 0  # every stage it ran was in the climb: nothing new is asked of the model
        replayed = EscalatingJudge(threshold=1.0).replay(full, 0.1)
        assert (replayed.preference, replayed.decided_by, replayed.probability_a, replayed.notes) == (
            made.preference,
            made.decided_by,
            made.probability_a,
            made.notes,
        )
        assert made.parts[0].probability_a == pytest.approx(direct.probability_a)  # stage 1 *is* direct-prob
    direct_run, low, high = results
    assert direct_run.overall.cost_per_verdict.lm_calls == 2.0
    assert 2.0 <= low.overall.cost_per_verdict.lm_calls <= high.overall.cost_per_verdict.lm_calls
    assert [t for _, _, t in curves(results)[("escalating-prob", "embedded")]] == [0.05, 0.3]
    write_report(results, tmp_path / "report", {"data": ["sample"], "pairs": 2, "split": "all", "seed": 0})
    assert (tmp_path / "report" / "plots" / "accuracy_vs_cost.png").stat().st_size > 5000


def test_an_escalating_program_tuned_on_dev_pairs_saves_calibrated_stages_and_its_threshold(
    server, cache, sample_pairs, tmp_path
):
    members, names = ladder()
    judge = EscalatingJudge(members[:2], names[:2])  # direct-prob, then analyses: the short ladder keeps this quick
    with backend("embedded", settings()):
        tuned = tune_escalation(judge, sample_pairs[16:20], split="dev", data=["sample"], thresholds=(0.0, 0.1, 0.5))
        path = tuned.save(tmp_path / "escalating.json")
        loaded = load_program(path)
        again = judge_pairs(loaded, sample_pairs[16:18], progress=False)
    assert [type(m).__name__ for m in loaded.members] == ["Calibrated", "Calibrated"]
    assert loaded.members[1].calibration.fitted_on["pairs"] == 4 and loaded.threshold in (0.0, 0.1, 0.5)
    table = loaded.options["chosen_on"]["table"]
    assert [row[0] for row in table] == [0.0, 0.1, 0.5] and 2.0 <= table[0][2] <= table[1][2] <= table[2][2] == 4.0
    assert max(row[1] for row in table) == next(row[1] for row in table if row[0] == loaded.threshold)
    assert all(j.lm_calls == 0 and j.decided_by in ("direct-prob", "analyses", None) for j in again)


def test_the_calibrate_command_fits_on_the_dev_split_and_refuses_the_test_split(server, tmp_path, sample_pairs):
    from reflectagent.cli import app
    from reflectagent.pairs import sample_path

    config = tmp_path / "reflectagent.toml"
    config.write_text('[backends.embedded]\nmodel = "embedded"\ncontext_chars = 4000\n')
    common = ["--data", str(sample_path()), "--config", str(config), "--cache-dir", str(tmp_path / "cache")]
    refused = CliRunner().invoke(app, ["calibrate", *common, "--split", "test", "-o", str(tmp_path / "x.json")])
    assert refused.exit_code == 2 and "never fit on the test split" in refused.output
    done = CliRunner().invoke(app, ["calibrate", *common, "--program", "direct-prob", "-o", str(tmp_path / "c.json")])
    assert done.exit_code == 0, done.output
    assert "GenRM: temperature T=" in done.output and "saved:" in done.output
    fitted = load_program(tmp_path / "c.json").calibration.fitted_on
    assert (
        fitted["split"] == "dev" and fitted["data"] == [f"{sample_path()} (dev split, seed 0)"] and fitted["pairs"] >= 4
    )
