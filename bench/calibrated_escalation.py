"""Calibration and escalation fitted on dev pairs, then measured on the quality bench's test pairs, with intervals.

    .venv/bin/python bench/calibrated_escalation.py [--preset qwen2.5-coder-1.5b-verdict] [--per-source 32]
        [--test-report bench/results/quality-1.5b-verdict] [--out bench/results/calibrated-escalation-1.5b-verdict]

Issue #34's acceptance: the escalating judge (``direct-prob`` -> ``genrm-prob``) and the calibration of
``direct-prob``'s P(A), each *fitted on dev pairs* and only then applied to the test pairs. Everything below is
fixed here, before any dev pair was judged.

Dev pairs: each of the five sets' **dev** split (``reflectagent.splits``, seed 0; the verdict adapter was trained
on the train split less every pair sharing a prompt with any dev or test pair, so dev pairs are as unseen as
test pairs), the usable pairs (labelled A or B, two distinct non-empty responses, prompt plus responses within
``--max-chars``, 2500 as the test sample), less every pair whose prompt is one of the 160 test pairs' prompts,
in a seeded order (``stable_fraction(DEV_ORDER, id)``), the first ``--per-source`` of each set (HHH has only 29
such pairs). They are judged, as given and swapped, by ``direct-prob`` and ``genrm-prob`` on the preset served
by the embedded vLLM server with the test run's settings (the preset's dtype, float32; ``judge_quality.py``'s
defaults otherwise); every step is cached in ``OUT/cache``, committed, so the same command run again makes no
LM call and starts no server.

Fitted on the dev judgments (each presentation's P(A) against whether its A is the better response, as
``reflectagent calibrate`` fits):

1. **Calibration of direct-prob's P(A)**: temperature and Platt scaling (``fit_calibration``). The method is
   chosen by 5-fold cross-validated dev log-loss (folds by pair, both presentations in one fold, seeded):
   Platt only if its held-out log-loss is lower than temperature's by more than 1e-6 (an in-sample log-loss
   would always favour Platt, which nests temperature); the chosen method is then fitted on all dev pairs.
   ``genrm-prob`` gets the same treatment, reported beside it (its verdicts in the ladder stay raw).
2. **The escalation threshold**: the ladder is the calibrated direct-prob, then genrm-prob (raw), as an
   :class:`EscalatingJudge`: a presentation escalates when direct-prob has no verdict, its two orders lean
   apart, or its calibrated |P(A) - 0.5| is under the threshold. Candidates: ``THRESHOLDS`` (0 to 0.5). The
   rule is ``choose_threshold``'s: the best dev accuracy (no verdict wrong), ties to the fewer LM calls per
   judgment, then to the lower threshold. Each threshold is replayed from one climb per presentation.

Applied to test, with no LM call: the stored judgments of ``--test-report`` (``judge_quality.py --preset
qwen2.5-coder-1.5b-verdict``: direct-prob and genrm-prob on the 160 test pairs, 32 a set) are put through the
fitted map and the ladder at the chosen threshold. Reported: ECE (10 bins, the eval's) and log-loss of P(A)
before and after calibration, with 95% bootstrap intervals over pairs (2000 resamples, seed 0) and of their
differences (the same resamples); the escalating judge's accuracy and LM calls per judgment beside direct-prob
and genrm-prob alone, with paired differences (``paired_difference``; calls by the same bootstrap). The test
curve over every threshold is written too, marked as not used for choosing.

Checks: the dev ladder is also run live (``EscalatingJudge`` at threshold 1 through the cache, so 0 LM calls),
and its replay at every threshold must give the verdicts and calls of the ladder assembled from the stages'
stored judgments, which is how the test side is assembled. Writes ``OUT/report.json``, ``OUT/report.md``,
``OUT/calibrated_escalation.png``, the fitted programs (``OUT/direct-prob.calibrated.json``,
``OUT/escalating-prob.calibrated.json``, usable as ``--program``) and ``OUT/run.json`` (each execution's LM
calls and seconds, appended).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from common import SOURCES, load_source, test_pairs  # bench/, beside this script
from escalation_replay import stored
from provenance import provenance

from reflectagent.backends import resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.eval import EvalRun, Record, bootstrap, paired_difference, run_eval, summarize
from reflectagent.eval.metrics import reliability
from reflectagent.eval.report import format_ci
from reflectagent.finetune.selection import usable
from reflectagent.pairs import Pair
from reflectagent.programs import Calibrated, EscalatingJudge, named_program
from reflectagent.programs.calibration import METHODS, fit_calibration, log_loss
from reflectagent.programs.calibration import calibrated as calibrate_judgment
from reflectagent.programs.calibration import provenance as fit_provenance
from reflectagent.programs.escalating import THRESHOLDS, charge_once
from reflectagent.results import Judgment
from reflectagent.splits import split_pairs, stable_fraction

STAGES = ("direct-prob", "genrm-prob")
DEV_ORDER = "calibrated-escalation-dev"  # the seed of the dev sample's order
CV_ORDER = "calibrated-escalation-cv"
FOLDS = 5
PLATT_MARGIN = 1e-6
RESAMPLES = 2000
logger = logging.getLogger("calibrated_escalation")


def dev_pairs(per_source: int, max_chars: int, test: list[Pair]) -> tuple[list[Pair], dict[str, int]]:
    """Each set's dev split, usable, no prompt of the test sample, in a seeded order: the first ``per_source``;
    and how many each set gave."""
    prompts = {p.prompt for p in test}
    chosen, counts = [], {}
    for source in SOURCES:
        dev = split_pairs(load_source(source), seed=0)["dev"]
        kept = [p for p in dev if usable(p, max_chars) and p.prompt not in prompts]
        taken = sorted(kept, key=lambda p: stable_fraction(DEV_ORDER, p.id))[:per_source]
        chosen += taken
        counts[source] = len(taken)
    return chosen, counts


def shown(judged: list[tuple[Pair, Judgment, Judgment]]) -> tuple[list[float], list[bool]]:
    """Each presentation's P(A) and whether its A is the better one (as ``calibrate`` fits); no P(A) left out."""
    probabilities, outcomes = [], []
    for pair, straight, swapped in judged:
        for judgment, a_better in ((straight, pair.label == "A"), (swapped, pair.label == "B")):
            if judgment.probability_a is not None:
                probabilities.append(judgment.probability_a)
                outcomes.append(a_better)
    return probabilities, outcomes


def cross_validated_loss(judged, method: str) -> float:
    """Mean held-out log-loss of ``method`` over FOLDS folds of the pairs (both presentations of a pair together)."""
    order = sorted(range(len(judged)), key=lambda i: stable_fraction(CV_ORDER, judged[i][0].id or str(i)))
    fold = {i: rank % FOLDS for rank, i in enumerate(order)}
    losses, n = 0.0, 0
    for k in range(FOLDS):
        fit_p, fit_y = shown([judged[i] for i in range(len(judged)) if fold[i] != k])
        held_p, held_y = shown([judged[i] for i in range(len(judged)) if fold[i] == k])
        if not held_p:
            continue
        fitted = fit_calibration(fit_p, fit_y, method)
        losses += log_loss([fitted.apply(p) for p in held_p], held_y) * len(held_p)
        n += len(held_p)
    return losses / n


def fit(judged, where: dict) -> dict:
    """Both methods' cross-validated dev log-loss, the rule's choice, and the choice fitted on every dev pair."""
    cv = {method: cross_validated_loss(judged, method) for method in METHODS}
    method = "platt" if cv["platt"] < cv["temperature"] - PLATT_MARGIN else "temperature"
    probabilities, outcomes = shown(judged)
    fits = {
        m: fit_calibration(
            probabilities, outcomes, m, {**where, "judgments": 2 * len(judged), "with_probability": len(probabilities)}
        )
        for m in METHODS
    }
    return {"cv_log_loss": cv, "method": method, "fits": fits, "chosen": fits[method]}


def calibrated(judgment: Judgment, calibration) -> Judgment:
    """What :class:`Calibrated` makes of an inner judgment (its ``adecide``), for a stored one: no LM call."""
    return calibrate_judgment(judgment, calibration, "GenRM")


def climb(stages: list[Judgment]) -> Judgment:
    """Every stage's judgment of one presentation as one climb at threshold 1, shared steps charged once."""
    parts: list[Judgment] = []
    for judgment in stages:
        parts.append(charge_once(judgment, parts))
    return Judgment(preference=None, parts=tuple(parts))


def records_of(pairs: list[Pair], judged: list[tuple[Judgment, Judgment]]) -> list[Record]:
    return [Record.from_judgments(p, a, b) for p, (a, b) in zip(pairs, judged)]


def accuracy_and_calls(records: list[Record]) -> tuple[float, float, float]:
    s = summarize(records)
    return s.accuracy.value, s.cost_per_verdict.lm_calls, s.cost_per_verdict.tokens


def ece_of(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """The eval's ECE (``reliability``), on arrays, for the bootstrap."""
    index = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        if count:
            error += count * abs(float(p[inside].mean()) - float(y[inside].mean()))
    return error / len(p)


def loss_of(p: np.ndarray, y: np.ndarray) -> float:
    return log_loss(p, y)


def probability_table(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, its two P(A) (original order) and its label: the eval's calibration convention."""
    p = np.array([r.probabilities for r in records], dtype=float)
    y = np.array([r.label == "A" for r in records], dtype=float)
    if np.isnan(p).any():
        raise SystemExit("a judgment without P(A): the intervals below assume every judgment has one")
    return p, y


def calibration_figures(before: list[Record], after: list[Record]) -> dict:
    """ECE and log-loss before and after, each with a bootstrap interval over pairs, and their differences."""
    p0, y = probability_table(before)
    p1, y1 = probability_table(after)
    assert (y == y1).all()

    def flat(p, idx):  # both presentations of the pairs drawn, against their labels
        return p[idx].ravel(), np.repeat(y[idx], 2)

    everything = np.arange(len(y))
    out = {}
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(RESAMPLES)]
    for name, metric in (("ece", ece_of), ("log_loss", loss_of)):
        values = {}
        for label, p in (("before", p0), ("after", p1)):
            values[label] = metric(*flat(p, everything))
        resampled = {
            label: np.array([metric(*flat(p, idx)) for idx in draws]) for label, p in (("before", p0), ("after", p1))
        }
        delta = resampled["after"] - resampled["before"]
        out[name] = {
            label: {"value": values[label], "ci": list(np.percentile(resampled[label], [2.5, 97.5]))}
            for label in ("before", "after")
        }
        out[name]["after_minus_before"] = {
            "value": values["after"] - values["before"],
            "ci": list(np.percentile(delta, [2.5, 97.5])),
        }
    # the same ECE as the eval reports (reliability over every P(A) of the records)
    for label, records in (("before", before), ("after", after)):
        expected = reliability(*flat(p0 if label == "before" else p1, everything)).ece
        assert abs(expected - summarize(records).calibration.ece) < 1e-12, "ECE differs from the eval's"
    out["judgments"] = 2 * len(y)
    return out


def fixed_and_escalating(pairs, runs: dict, threshold: float, judge: EscalatingJudge, climbs) -> dict:
    """Accuracy (interval), calls and tokens per judgment of each fixed stage and the ladder at ``threshold``,
    and the ladder's paired differences against each stage."""
    ladder = records_of(pairs, [tuple(judge.replay(j, threshold) for j in both) for both in climbs])
    rows = {}
    for name, records in [*((n, records_of(pairs, runs[n])) for n in STAGES), (f"escalating @ {threshold:g}", ladder)]:
        s = summarize(records)
        rows[name] = {
            "accuracy": s.accuracy.value,
            "ci": list(s.accuracy.ci),
            "calls_per_judgment": s.cost_per_verdict.lm_calls,
            "tokens_per_judgment": s.cost_per_verdict.tokens,
            "ece": s.calibration.ece,
        }
    paired = {}
    for name in STAGES:
        base = records_of(pairs, runs[name])
        difference = paired_difference(ladder, base)
        calls = [(a.lm_calls - b.lm_calls) / 2 for a, b in zip(ladder, base)]
        tokens = [
            (a.prompt_tokens + a.completion_tokens - b.prompt_tokens - b.completion_tokens) / 2
            for a, b in zip(ladder, base)
        ]
        paired[name] = {
            "accuracy": {"value": difference.value, "ci": list(difference.ci), "pairs": difference.n},
            "calls_per_judgment": {"value": sum(calls) / len(calls), "ci": list(bootstrap(calls))},
            "tokens_per_judgment": {"value": sum(tokens) / len(tokens), "ci": list(bootstrap(tokens))},
        }
    escalated = sum(j.decided_by != STAGES[0] for both in climbs for j in (judge.replay(x, threshold) for x in both))
    return {"runs": rows, "paired_against": paired, "escalated_judgments": escalated, "judgments": 2 * len(pairs)}


def dev_row(pairs, judged) -> dict:
    s = summarize(records_of(pairs, judged))
    return {
        "accuracy": s.accuracy.value,
        "ci": list(s.accuracy.ci),
        "calls_per_judgment": s.cost_per_verdict.lm_calls,
        "tokens_per_judgment": s.cost_per_verdict.tokens,
        "ece": s.calibration.ece,
    }


def curve(pairs, judge: EscalatingJudge, climbs) -> list[dict]:
    rows = []
    for threshold in THRESHOLDS:
        records = records_of(pairs, [tuple(judge.replay(j, threshold) for j in both) for both in climbs])
        accuracy, calls, tokens = accuracy_and_calls(records)
        rows.append(
            {"threshold": threshold, "accuracy": accuracy, "calls_per_judgment": calls, "tokens_per_judgment": tokens}
        )
    return rows


def choose(table: list[dict]) -> dict:
    """``choose_threshold``'s rule: the best accuracy, then the fewer calls, then the lower threshold."""
    return max(table, key=lambda row: (row["accuracy"], -row["calls_per_judgment"], -row["threshold"]))


def plot(report: dict, test_before: list[Record], test_after: list[Record], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("no matplotlib: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for records, label, colour in (
        (test_before, "direct-prob raw", "tab:red"),
        (test_after, "calibrated on dev", "tab:blue"),
    ):
        bins = summarize(records).calibration.bins
        xs = [b.mean_probability for b in bins if b.count]
        ys = [b.frequency for b in bins if b.count]
        sizes = [8 + 2 * b.count for b in bins if b.count]
        left.plot(xs, ys, color=colour, lw=1)
        left.scatter(xs, ys, s=sizes, color=colour, alpha=0.6, label=label)
    ece = report["test"]["calibration"]["direct-prob"]["ece"]
    left.set_title(f"test P(A): ECE {ece['before']['value']:.3f} -> {ece['after']['value']:.3f}")
    left.set_xlabel("mean P(A) in bin")
    left.set_ylabel("share labelled A")
    left.legend(loc="upper left")
    for split, colour in (("dev", "tab:grey"), ("test", "tab:blue")):
        rows = report[split]["curve"]
        right.plot(
            [r["calls_per_judgment"] for r in rows],
            [r["accuracy"] for r in rows],
            marker="o",
            ms=3,
            color=colour,
            label=f"ladder on {split} (every threshold)",
        )
    chosen = report["dev"]["threshold"]
    esc = report["test"]["escalation"]["runs"][f"escalating @ {chosen:g}"]
    right.scatter(
        [esc["calls_per_judgment"]],
        [esc["accuracy"]],
        s=80,
        marker="*",
        color="black",
        zorder=5,
        label=f"test at the dev-chosen T = {chosen:g}",
    )
    for name, marker, colour in zip(STAGES, ("s", "^"), ("tab:green", "tab:orange")):
        for split, fill in (("dev", "none"), ("test", colour)):
            runs = report["dev"]["runs"] if split == "dev" else report["test"]["escalation"]["runs"]
            row = runs[name]
            right.scatter(
                [row["calls_per_judgment"]],
                [row["accuracy"]],
                marker=marker,
                s=50,
                facecolors=fill,
                edgecolors=colour,
                label=f"{name} ({split})",
            )
    right.set_xlabel("LM calls per judgment")
    right.set_ylabel("accuracy")
    right.set_title("direct-prob -> genrm-prob")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pct(value: float) -> str:
    return f"{value:.1%}"


def points(d: dict) -> str:
    return f"{100 * d['value']:+.1f} pts [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"


def markdown(report: dict) -> str:
    dev, test = report["dev"], report["test"]
    t = dev["threshold"]
    lines = [
        "# Calibration and escalation fitted on dev, measured on test",
        "",
        f"`{report['command']}` at {report['commit']}. Judge: {report['backend']}. Dev: {dev['pairs']} pairs "
        f"({', '.join(f'{k} {v}' for k, v in dev['per_source'].items())}), prompt-disjoint from the "
        f"{test['pairs']} test pairs (`{report['test_report']}`, stored judgments, no LM call).",
        "",
        "## Fitted on dev",
        "",
    ]
    for name, c in dev["calibration"].items():
        chosen = c["chosen"]
        cv = ", ".join(f"{m} {v:.4f}" for m, v in c["cv_log_loss"].items())
        what = (
            f"T = {1 / chosen['slope']:.3f}"
            if chosen["method"] == "temperature"
            else f"a = {chosen['slope']:.3f}, b = {chosen['intercept']:+.3f}"
        )
        lines.append(
            f"- {name}: {chosen['method']} ({what}); 5-fold dev log-loss {cv}; dev log-loss "
            f"{chosen['log_loss_before']:.4f} -> {chosen['log_loss_after']:.4f}"
        )
    for name, row in dev["runs"].items():
        e = dev["calibration_in_sample"][name]["ece"]
        lines.append(
            f"- {name} on dev: accuracy {pct(row['accuracy'])}{format_ci(row['ci'])}, ECE {e['before']['value']:.3f} "
            f"-> {e['after']['value']:.3f} calibrated (in sample)"
        )
    lines += [
        f"- threshold (calibrated direct-prob margin): **{t:g}**, dev accuracy {pct(dev['chosen']['accuracy'])} "
        f"at {dev['chosen']['calls_per_judgment']:.2f} calls per judgment",
        "",
        "| threshold | dev accuracy | dev calls/judgment | test accuracy (not used to choose) | test calls/judgment |",
        "|---|---|---|---|---|",
    ]
    for d, s in zip(dev["curve"], test["curve"]):
        mark = " (chosen)" if d["threshold"] == t else ""
        lines.append(
            f"| {d['threshold']:g}{mark} | {pct(d['accuracy'])} | {d['calls_per_judgment']:.2f} | "
            f"{pct(s['accuracy'])} | {s['calls_per_judgment']:.2f} |"
        )
    lines += [
        "",
        "## Test: calibration of P(A)",
        "",
        "| program | ECE before | ECE after | after - before | log-loss before | log-loss after | after - before |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in test["calibration"].items():
        e, ll = c["ece"], c["log_loss"]

        def ci(d):
            return f"{d['value']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"

        def signed(d):
            return f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"

        lines.append(
            f"| {name} | {ci(e['before'])} | {ci(e['after'])} | {signed(e['after_minus_before'])} | "
            f"{ci(ll['before'])} | {ci(ll['after'])} | {signed(ll['after_minus_before'])} |"
        )
    esc = test["escalation"]
    lines += [
        "",
        f"## Test: the ladder at the dev-chosen threshold ({t:g})",
        "",
        "| run | accuracy | LM calls / judgment | tokens / judgment | ECE |",
        "|---|---|---|---|---|",
    ]
    for name, row in esc["runs"].items():
        lines.append(
            f"| {name} | {pct(row['accuracy'])}{format_ci(row['ci'])} | {row['calls_per_judgment']:.2f} | "
            f"{row['tokens_per_judgment']:.0f} | {row['ece']:.3f} |"
        )
    lines += [
        "",
        f"Escalated: {esc['escalated_judgments']} of {esc['judgments']} judgments.",
        "",
        "| ladder minus | accuracy | LM calls / judgment | tokens / judgment |",
        "|---|---|---|---|",
    ]
    for name, d in esc["paired_against"].items():
        c, k = d["calls_per_judgment"], d["tokens_per_judgment"]
        lines.append(
            f"| {name} | {points(d['accuracy'])} | {c['value']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] | "
            f"{k['value']:+.0f} [{k['ci'][0]:+.0f}, {k['ci'][1]:+.0f}] |"
        )
    lines += [
        "",
        "Intervals: 95% bootstrap over pairs (accuracy and its paired differences: the eval's; ECE and "
        f"log-loss: {RESAMPLES} resamples, seed 0, the same resamples before and after). A judgment is one "
        "presentation; both presentations of a pair share their LM calls through the cache.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-coder-1.5b-verdict")
    parser.add_argument(
        "--dtype", default=None, help="the server's dtype (default: the preset's, as the test judgments)"
    )
    parser.add_argument("--per-source", type=int, default=32, help="dev pairs per set (HHH has 29)")
    parser.add_argument("--max-chars", type=int, default=2500, help="as the test sample")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument(
        "--test-report",
        type=Path,
        default=Path("bench/results/quality-1.5b-verdict"),
        help="a quality-bench report folder with direct-prob and genrm-prob judgments of the test pairs",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibrated-escalation-1.5b-verdict"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    # Test: the stored judgments, checked to be the quality bench's first sample.
    test_meta = json.loads((args.test_report / "report.json").read_text())["meta"]
    test, stored_runs, test_backend = stored(args.test_report)
    expected = test_pairs(test_meta["per_source"], test_meta["max_chars"], test_meta["skip"])
    if [p.id for p in test] != [p.id for p in expected] or test_meta["split"] != "test":
        raise SystemExit(f"{args.test_report} did not judge the quality bench's test sample")
    missing = [s for s in STAGES if s not in stored_runs]
    if missing:
        raise SystemExit(f"{args.test_report} has no run of {', '.join(missing)}")

    dev, per_source = dev_pairs(args.per_source, args.max_chars, test)
    assert not {p.id for p in dev} & {p.id for p in test} and not {p.prompt for p in dev} & {p.prompt for p in test}
    data = [f"{s}.jsonl" for s in SOURCES]
    where = fit_provenance(dev, "dev", data, seed=0, order=DEV_ORDER, max_chars=args.max_chars)

    backend = BackendConfig(model="embedded", model_path=args.preset, dtype=args.dtype, timeout_s=args.timeout_s)
    lm = resolve_backend("local", Settings(backends={"local": backend}))
    dtype = lm.backend.identity.get("dtype", "bfloat16")
    label = f"{args.preset} {dtype}"
    if label != test_backend:
        raise SystemExit(f"the dev judge ({label}) is not the test judgments' ({test_backend}): give --preset/--dtype")

    args.out.mkdir(parents=True, exist_ok=True)
    facts, dev_runs = [], {}
    with use_cache(JudgmentCache(args.out / "cache")):
        for name in STAGES:  # one run at a time: an interrupted run keeps whole runs in the cache
            [result] = run_eval(
                dev,
                [EvalRun(name, label, named_program(name), lm)],
                concurrency=args.concurrency,
                progress=sys.stderr.isatty(),
            )
            dev_runs[name] = result.judgments
            facts.append(result.run_dict())
            logger.info(
                "dev %s: accuracy %.3f, %d LM calls made, %.0f s",
                name,
                result.overall.accuracy.value,
                result.run.lm_calls_made,
                result.run.wall_s_all_runs,
            )

        calibration = {name: fit(dev_runs[name], where) for name in STAGES}
        direct = calibration["direct-prob"]["chosen"]
        judge = EscalatingJudge(
            [(Calibrated(named_program("direct-prob"), direct), None), (named_program("genrm-prob"), None)],
            list(STAGES),
            threshold=1.0,
        )

        # The ladder from the stages' judgments (how the test side is assembled) ...
        dev_climbs = [
            tuple(
                climb([calibrated(dev_runs["direct-prob"][i][1 + side], direct), dev_runs["genrm-prob"][i][1 + side]])
                for side in (0, 1)
            )
            for i in range(len(dev))
        ]
        # ... and run live through the cache: every threshold's replay must agree
        [live] = run_eval(
            dev,
            [EvalRun("escalating-prob:1", label, judge, lm)],
            concurrency=args.concurrency,
            progress=sys.stderr.isatty(),
        )
        facts.append(live.run_dict())
        if live.run.lm_calls_made:
            logger.warning("the live ladder made %d LM calls: some step was not cached", live.run.lm_calls_made)
    for threshold in THRESHOLDS:
        for i, (_, a, b) in enumerate(live.judgments):
            for side, made in ((0, a), (1, b)):
                x, y = judge.replay(made, threshold), judge.replay(dev_climbs[i][side], threshold)
                if (x.preference, x.cost.lm_calls, x.decided_by) != (
                    y.preference,
                    y.cost.lm_calls,
                    y.decided_by,
                ) or abs((x.probability_a or 0) - (y.probability_a or 0)) > 1e-9:
                    raise SystemExit(
                        f"dev pair {dev[i].id} ({'swapped' if side else 'as given'}) at {threshold:g}: the live "
                        f"ladder gives {x.preference} / {x.cost.lm_calls} calls, assembled {y.preference} / "
                        f"{y.cost.lm_calls}"
                    )

    dev_curve = curve(dev, judge, dev_climbs)
    chosen = choose(dev_curve)
    threshold = chosen["threshold"]

    # Saved as programs: usable as --program of eval, serve-rm, rewards.
    Calibrated(named_program("direct-prob"), direct).save(args.out / "direct-prob.calibrated.json")
    tuned = judge.with_threshold(threshold)
    tuned.options["chosen_on"] = {
        **where,
        "table": [[r["threshold"], r["accuracy"], r["calls_per_judgment"]] for r in dev_curve],
        "rule": "best dev accuracy, then fewer calls, then the lower threshold",
    }
    tuned.save(args.out / "escalating-prob.calibrated.json")

    # Test: the stored judgments through the dev fits; no LM call.
    test_climbs = [
        tuple(
            climb([calibrated(stored_runs["direct-prob"][i][side], direct), stored_runs["genrm-prob"][i][side]])
            for side in (0, 1)
        )
        for i in range(len(test))
    ]
    dev_calibration = {}  # in-sample: the fit's own pairs
    for name in STAGES:
        judged = [(a, b) for _, a, b in dev_runs[name]]
        dev_calibration[name] = calibration_figures(
            records_of(dev, judged),
            records_of(dev, [tuple(calibrated(j, calibration[name]["chosen"]) for j in both) for both in judged]),
        )
    test_calibration = {}
    for name in STAGES:
        fitted = calibration[name]["chosen"]
        before = records_of(test, stored_runs[name])
        after = records_of(test, [tuple(calibrated(j, fitted) for j in both) for both in stored_runs[name]])
        test_calibration[name] = calibration_figures(before, after)
        if name == "direct-prob":
            plot_records = (before, after)

    report = {
        **provenance(),
        "backend": label,
        "test_report": str(args.test_report),
        "dev": {
            "pairs": len(dev),
            "per_source": per_source,
            "split": "dev",
            "seed": 0,
            "order": DEV_ORDER,
            "max_chars": args.max_chars,
            "fitted_on": where,
            "runs": {name: dev_row(dev, [(a, b) for _, a, b in dev_runs[name]]) for name in STAGES},
            "calibration_in_sample": dev_calibration,
            "calibration": {
                name: {
                    "cv_log_loss": c["cv_log_loss"],
                    "method": c["method"],
                    "fits": {m: f.to_dict() for m, f in c["fits"].items()},
                    "chosen": c["chosen"].to_dict(),
                }
                for name, c in calibration.items()
            },
            "curve": dev_curve,
            "chosen": chosen,
            "threshold": threshold,
            "live_check": "the live EscalatingJudge's replay equals the assembled ladder at every threshold",
        },
        "test": {
            "pairs": len(test),
            "calibration": test_calibration,
            "escalation": fixed_and_escalating(
                test, {n: stored_runs[n] for n in STAGES}, threshold, judge, test_climbs
            ),
            "curve": curve(test, judge, test_climbs),
        },
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    plot(report, *plot_records, args.out / "calibrated_escalation.png")
    history = json.loads((args.out / "run.json").read_text()) if (args.out / "run.json").exists() else []
    history.append(
        {
            "commit": report["commit"],
            "command": report["command"],
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": facts,
        }
    )
    (args.out / "run.json").write_text(json.dumps(history, indent=1) + "\n")
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
