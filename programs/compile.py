"""Compiling judges with DSPy optimisers, and the metric they optimise.

The metric scores a judgment against a pair's label: 1 for the right preference, 0 for the
wrong one *or none at all* (an unparsed or inconsistent judge earns nothing), and 0.5 on a
"tie" label whatever the judge says (ties carry no signal for a pairwise judge; better left
out of train sets). When an optimiser bootstraps demos (``trace`` is given) the metric is
STaR's filter: a judgment is kept only if its verdict is right *and* every parsed analysis
agrees with the label and every reflection chose an analysis with the right verdict, so no
wrong rationale becomes a demo.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import dspy

from reflectagent.judging.base import Judge
from reflectagent.judging.runs import judge_pairs
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment
from reflectagent.records.teacher import TeacherJudgment

INPUTS = ("prompt", "response_a", "response_b")


def to_examples(pairs: list[Pair]) -> list[dspy.Example]:
    """Labelled pairs as DSPy examples (inputs: prompt, response_a, response_b)."""
    unlabelled = [p.id for p in pairs if p.label is None]
    if unlabelled:
        raise ValueError(f"compiling needs labels; unlabelled pairs: {unlabelled[:5]}")
    return [dspy.Example(**p.inputs(), label=p.label, id=p.id).with_inputs(*INPUTS) for p in pairs]


def preference_metric(example, prediction: Judgment, trace=None) -> float | bool:
    label = example.label
    if trace is None:
        if label == "tie":
            return 0.5
        return 1.0 if prediction.preference == label else 0.0
    if label not in ("A", "B") or prediction.preference != label:
        return False
    analyses = prediction.analyses
    if any(a.parsed and a.preference != label for a in analyses):
        return False
    return all(r.more_reliable is None or analyses[r.more_reliable].preference == label for r in prediction.reflections)


def evaluate_judge(program: Judge, pairs: list[Pair], concurrency: int = 8, progress: bool = False) -> float:
    """Mean :func:`preference_metric` over labelled ``pairs``."""
    judgments = judge_pairs(program, pairs, concurrency=concurrency, progress=progress)
    examples = to_examples(pairs)
    return sum(preference_metric(e, j) for e, j in zip(examples, judgments)) / len(pairs)


def compile_judge(
    program: Judge,
    trainset: list[Pair],
    optimizer: Literal["bootstrap", "mipro", "gepa"] = "bootstrap",
    *,
    max_demos: int = 2,
    prompt_model: dspy.BaseLM | None = None,
    valset: list[Pair] | None = None,
    num_threads: int = 4,
    **options,
) -> Judge:
    """Return a compiled copy of ``program`` (the original is untouched).

    ``bootstrap``: BootstrapFewShot, demos from the program's own correct traces (STaR).
    ``mipro``: MIPROv2, new instructions proposed by ``prompt_model`` plus bootstrapped demos.
    ``gepa``: GEPA, instructions evolved from textual feedback by ``prompt_model``.
    Extra ``options`` go to the optimiser's constructor.
    """
    train = to_examples(trainset)
    if optimizer == "bootstrap":
        teleprompter = dspy.BootstrapFewShot(
            metric=preference_metric, max_bootstrapped_demos=max_demos, max_labeled_demos=0, **options
        )
        return teleprompter.compile(program, trainset=train)
    if optimizer == "mipro":
        num_trials = options.pop("num_trials", 4)
        defaults = dict(
            auto=None,
            num_candidates=2,
            max_bootstrapped_demos=max_demos,
            max_labeled_demos=0,
            num_threads=num_threads,
            verbose=False,
        )
        teleprompter = dspy.MIPROv2(metric=preference_metric, prompt_model=prompt_model, **{**defaults, **options})
        return teleprompter.compile(
            program,
            trainset=train,
            valset=to_examples(valset) if valset else None,
            num_trials=num_trials,
            minibatch=False,
        )
    if optimizer == "gepa":
        if prompt_model is None:
            raise ValueError("GEPA needs a prompt_model to reflect with (a strong LM)")
        teleprompter = dspy.GEPA(
            metric=gepa_feedback,
            reflection_lm=prompt_model,
            num_threads=num_threads,
            **{"max_metric_calls": 200, **options},
        )
        return teleprompter.compile(program, trainset=train, valset=to_examples(valset) if valset else train)
    raise ValueError(f"optimizer must be 'bootstrap', 'mipro' or 'gepa', not {optimizer!r}")


def gepa_feedback(gold, pred: Judgment, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
    """GEPA's metric: the score plus what went wrong, in words the reflection LM can use."""
    score = preference_metric(gold, pred)
    if pred.preference is None:
        feedback = f"No verdict ({pred.reason}); the better response was {gold.label}."
    elif score == 1.0:
        feedback = f"Correct: {gold.label} is better."
    else:
        feedback = f"Wrong: the judge preferred {pred.preference}, but {gold.label} is better."
    wrong = [a for a in pred.analyses if a.parsed and a.preference != gold.label]
    if wrong:
        feedback += f" {len(wrong)} of {len(pred.analyses)} analyses chose wrongly, e.g.: {wrong[0].text[:300]}"
    return dspy.Prediction(score=score, feedback=feedback)


def teacher_demos(
    judgments: Sequence[TeacherJudgment], k: int = 2, *, max_chars: int = 1500, seed: int = 0
) -> list[dspy.Example]:
    """``k`` short teacher judgments as analysis demos, alternating A and B preferences.

    Chosen by a seeded draw among pairs of at most ``max_chars`` characters, never by a score on
    evaluation pairs; A and B alternate because demos that all prefer one position teach that position.
    """
    rng = random.Random(seed)
    by_side = {
        side: [
            j
            for j in judgments
            if j.preference == side
            and len(j.pair.prompt) + len(j.pair.response_a) + len(j.pair.response_b) <= max_chars
        ]
        for side in ("A", "B")
    }
    for pool in by_side.values():
        rng.shuffle(pool)
    chosen = [by_side["AB"[i % 2]][i // 2] for i in range(k) if i // 2 < len(by_side["AB"[i % 2]])]
    if len(chosen) < k:
        raise ValueError(f"only {len(chosen)} teacher judgments of A and B within {max_chars} characters; {k} wanted")
    return [
        dspy.Example(**j.pair.inputs(), analysis=j.analysis, preference=j.preference).with_inputs(*INPUTS)
        for j in chosen
    ]


def with_demos(program: Judge, demos: list[dspy.Example]) -> Judge:
    """A copy of ``program`` whose analysis steps (analysis + preference) show ``demos``; others are untouched."""
    compiled = program.deepcopy()
    for _, predictor in compiled.named_predictors():
        if set(predictor.signature.output_fields) == {"analysis", "preference"}:
            predictor.demos = list(demos)
    return compiled
