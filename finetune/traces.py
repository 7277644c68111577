"""Teacher traces: a judge program run over labelled train pairs, every analysis and reflection kept.

Any program on any backend can teach (a strong API model, a served Qwen3; here the embedded
model). ReflectRM with k samples gives analyses in both orders and reflections on the ones
that disagree; run it on a backend with temperature > 0 (sample 0 uses the backend's
temperature, the others the program's) so the samples differ. Every step goes through the
judgment cache, so an interrupted collection resumes.

A file of strong-model judgments teaches too (:func:`distil_file`): its analysis, shown in both
orders, is the right answer of each pair, and the student's own analyses of the same pair supply
the wrong ones that Reflect and STaR-DPO rows contrast it with.

Labels alone teach the verdict (:func:`label_data`), and a teacher file's own analyses teach the
rationale then the verdict (:func:`teacher_data`): no trace and no LM call, only the backend's
adapter and input budget, so the rows are what that backend is served.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from reflectagent.calling.config import Settings
from reflectagent.finetune.data import DataConfig, Trace, UnifiedData, build_unified_data, build_verdict_data
from reflectagent.judging.base import Judge
from reflectagent.judging.runs import judge_pairs
from reflectagent.programs import GenRM, ReflectRM
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Judgment, Reflection
from reflectagent.records.teacher import TeacherJudgment


def collect_traces(
    pairs: list[Pair],
    program: Judge | None = None,
    *,
    samples: int = 4,
    temperature: float = 0.8,
    concurrency: int = 8,
    progress: bool = True,
) -> list[Trace]:
    """Judge each labelled pair with ``program`` (default: ReflectRM with ``samples`` analyses)."""
    labelled = [p for p in pairs if p.label in ("A", "B")]
    program = program or ReflectRM(samples=samples, temperature=temperature)
    judgments = judge_pairs(program, labelled, concurrency=concurrency, progress=progress)
    return [Trace(pair, judgment) for pair, judgment in zip(labelled, judgments)]


def for_backend(config: DataConfig | None, backend) -> DataConfig:
    """``config`` (default: ``DataConfig()``) with the input budget of ``backend`` where it names none."""
    config = config or DataConfig()
    if config.context_chars is None:
        return dataclasses.replace(config, context_chars=backend.context_chars)
    return config


def distil(
    pairs: list[Pair],
    teacher: str | None,
    settings: Settings,
    out: Path,
    config: DataConfig | None = None,
    *,
    samples: int = 4,
    temperature: float = 0.8,
    concurrency: int = 8,
    progress: bool = True,
    card: dict | None = None,
) -> UnifiedData:
    """Teacher traces on ``pairs`` with backend ``teacher``, then the unified data, saved into ``out``.

    The rows are rendered by the teacher backend's own adapter, and cut to its input budget unless
    ``config.context_chars`` says otherwise (:func:`for_backend`), so they match what that backend
    is served. ``teacher`` None is the configured default backend. ``out`` gets
    the datasets, the data card and ``traces.jsonl`` (every teacher analysis with its
    correctness, for reading; resuming goes through the cache); ``card`` adds to the data card (say
    which pairs these are).
    """
    program = ReflectRM(samples=samples, temperature=temperature)
    return _distil(
        lambda: collect_traces(pairs, program, concurrency=concurrency, progress=progress),
        teacher,
        settings,
        out,
        config,
        concurrency,
        card,
    )


def teacher_traces(judgments: list[TeacherJudgment], student: list[Trace | None] | None = None) -> list[Trace]:
    """Each judgment as a trace: the teacher's analysis in both orders, then the analyses of ``student[i]``,
    the student's trace of the same pair (matched by position: ids are optional; None where it has none).
    The student's reflections are dropped: they are not the teacher's."""
    student = student if student is not None else [None] * len(judgments)
    if len(student) != len(judgments):
        raise ValueError(f"{len(student)} student traces for {len(judgments)} teacher judgments: they go by position")
    return [
        Trace(
            j.pair,
            Judgment(
                preference=j.preference,
                analyses=(j.as_analysis(False), j.as_analysis(True), *(theirs.judgment.analyses if theirs else ())),
            ),
        )
        for j, theirs in zip(judgments, student)
    ]


def with_teacher_reflections(trace: Trace) -> Trace:
    """The trace with a reflection on every two of its analyses that disagree, in both orders, written from the
    teacher's own analysis: which verdict each analysis reaches, the teacher's reasons (about the responses, in the
    order the reflection shows them), and so which analysis is the more reliable.

    Why: a teacher file holds analyses, not reflections, and a small student cannot rationalise them: told which
    analysis was right, the untrained Qwen2.5-Coder-0.5B wrote the single letter "A" as the reflection in 285 of
    294 (``bench/loso.py --target reflectrm``). The reflection then carries the teacher's explanation, as the
    rationale target's rows do; its frame is a template, which the data card names."""
    judgment, label = trace.judgment, trace.pair.label
    reasons = next((a.text for a in judgment.analyses if a.sample == -1 and not a.swapped), None)
    if reasons is None:
        raise ValueError(f"pair {trace.pair.id}: no teacher analysis in its own order to reflect from")
    right = [i for i, a in enumerate(judgment.analyses) if a.parsed and a.preference == label]
    wrong = [i for i, a in enumerate(judgment.analyses) if a.parsed and a.preference != label]
    reflections = []
    for good in right:
        for bad in wrong:
            for first, second in ((good, bad), (bad, good)):
                shown = {first: "1", second: "2"}
                text = (
                    f"Analysis {shown[good]} prefers Response {judgment.analyses[good].preference}, analysis "
                    f"{shown[bad]} Response {judgment.analyses[bad].preference}; the responses decide between them. "
                    f"{reasons.strip()} So analysis {shown[good]} is the more reliable."
                )
                reflections.append(Reflection(text, first, second, good, parsed=True, raw=text))
    return Trace(trace.pair, dataclasses.replace(judgment, reflections=tuple(reflections)))


def distil_file(
    judgments: list[TeacherJudgment],
    student: str | None,
    settings: Settings,
    out: Path,
    config: DataConfig | None = None,
    *,
    samples: int = 2,
    temperature: float = 0.8,
    concurrency: int = 8,
    progress: bool = True,
    reflections: Literal["student", "teacher"] = "student",
) -> UnifiedData:
    """Unified data taught by a file of judgments; ``student`` (a backend) writes the analyses they are
    contrasted with (``samples`` per pair, both orders). Labels are the teacher's: the data card says so.
    The reflections on them are rationalised by the student (``"student"``, where ``config.rationalize``), or
    written from the teacher's analysis (``"teacher"``: :func:`with_teacher_reflections`, no LM call)."""
    if reflections not in ("student", "teacher"):
        raise ValueError(f"reflections is 'student' or 'teacher', not {reflections!r}")
    if reflections == "teacher":  # every row then comes from the teacher: nothing for the student to rationalise
        config = dataclasses.replace(config or DataConfig(), rationalize=False)
    labelled = [j for j in judgments if j.preference in ("A", "B")]
    program = GenRM(samples=max(1, samples // 2), both_orders=True, temperature=temperature)

    def traces() -> list[Trace]:
        own = judge_pairs(program, [j.pair for j in labelled], concurrency=concurrency, progress=progress)
        made = teacher_traces(labelled, [Trace(j.pair, judgment) for j, judgment in zip(labelled, own)])
        return [with_teacher_reflections(t) for t in made] if reflections == "teacher" else made

    card = {
        "labels": "the teacher's preference: the file carries no human label",
        "teachers": sorted({j.teacher for j in labelled}),
        "reflections": "rationalised by the student"
        if reflections == "student"
        else "the teacher's analysis in a fixed frame (which verdict each analysis reaches; so which is the more reliable)",
    }
    return _distil(traces, student, settings, out, config, concurrency, card)


def _as_served(student: str | None, settings: Settings, config: DataConfig | None):
    """Backend ``student``'s adapter, input budget and ``config`` with its budget: rows rendered and cut as it is
    served, without starting it."""
    from reflectagent.calling.backends import resolve_backend

    lm = resolve_backend(student, settings)
    budget = lm.backend.input_budget() if (config or DataConfig()).context_chars is None else None
    return lm.backend.adapter(), budget, for_backend(config, lm.backend)


def label_data(
    pairs: list[Pair],
    student: str | None,
    settings: Settings,
    out: Path,
    config: DataConfig | None = None,
    card: dict | None = None,
) -> UnifiedData:
    """Verdict rows (:func:`build_verdict_data`) from the pairs' labels, rendered and cut as backend ``student``
    is served, saved into ``out``. Makes no LM call and starts no server; ``card`` adds to the data card
    (say where the labels come from)."""
    adapter, budget, config = _as_served(student, settings, config)
    built = build_verdict_data(pairs, config, adapter=adapter, budget=budget)
    built.stats.update(card or {})
    built.save(out)
    return built


def teacher_data(
    judgments: list[TeacherJudgment],
    student: str | None,
    settings: Settings,
    out: Path,
    config: DataConfig | None = None,
    card: dict | None = None,
) -> UnifiedData:
    """GenRM's rationale-then-verdict rows from a teacher file alone: each judgment's own analysis, shown in both
    orders (:func:`teacher_traces`), is the pair's response row, rendered and cut as backend ``student`` is served,
    saved into ``out``. A strong teacher's explanation stands in for the rationalisation GenRM asks a model for, so
    there is no LM call, no server and no analysis-preference row (nothing wrong to contrast it with: that takes a
    student's analyses, :func:`distil_file`). Labels are the teacher's; ``card`` adds to the data card."""
    adapter, budget, config = _as_served(student, settings, config)
    traces = teacher_traces([j for j in judgments if j.preference in ("A", "B")])
    built = build_unified_data(traces, config, None, adapter=adapter, budget=budget)
    built.stats.update({"labels": "the teacher's preference", "teachers": sorted({j.teacher for j in judgments})})
    built.stats.update(card or {})
    return save(built, traces, out)


def _distil(
    make_traces,
    name: str | None,
    settings: Settings,
    out: Path,
    config: DataConfig | None,
    concurrency: int,
    card: dict | None = None,
) -> UnifiedData:
    """Traces made on backend ``name``, turned into unified data rendered and cut as that backend is served
    (its characters and tokens, unless ``config.context_chars`` names a budget); ``card`` adds to the data card."""
    from reflectagent.calling.backends import backend
    from reflectagent.finetune.rationalize import Rationalizer

    with backend(name, settings) as lm:
        traces = make_traces()  # first: a dead backend stops here, cleanly, before its budget is asked for
        budget = lm.backend.input_budget() if (config or DataConfig()).context_chars is None else None
        config = for_backend(config, lm.backend)
        built = build_unified_data(
            traces,
            config,
            Rationalizer() if config.rationalize else None,
            adapter=lm.backend.adapter(),
            concurrency=concurrency,
            budget=budget,
        )
    built.stats.update(card or {})
    return save(built, traces, out)


def save(built: UnifiedData, traces: list[Trace], out: Path) -> UnifiedData:
    """The datasets and data card, and ``traces.jsonl``: every analysis with its correctness, for reading."""
    out = Path(out)
    built.save(out)
    with open(out / "traces.jsonl", "w", encoding="utf-8") as handle:
        for t in traces:
            right = [a.parsed and a.preference == t.pair.label for a in t.judgment.analyses]
            handle.write(
                json.dumps(
                    {"pair": t.pair.to_dict(), "judgment": t.judgment.to_dict(), "analysis_correct": right},
                    ensure_ascii=False,
                )
                + "\n"
            )
    return built
