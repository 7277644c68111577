"""ReflectRM's unified training data, distilled from judge traces.

From each labelled pair's trace (a teacher program's analyses in both orders and its
reflections), three kinds of rows:

- response preference (GenRM / STaR): every analysis that reached the labelled verdict
  becomes a target (analysis, then verdict) for the pair as it was shown; a (pair, order)
  with no correct sample can be *rationalised* (the teacher is told the answer), and such
  rows are marked. Both orders of a pair appear, so training teaches order invariance.
- analysis preference (ReflectRM): where a pair has a right and a wrong analysis, a Reflect
  example with the two in random positions whose target names the right one, with a
  teacher reflection that chose it (else a rationalised one).
- STaR-DPO triples: the same prompt with a right (chosen) and a wrong (rejected) analysis.

Apart from these, :func:`build_verdict_data` makes *verdict* rows from labels alone: the verdict
token without a rationale (``Prefer``, GenRM's direct variant, the ``direct-prob`` program), in both
orders. They need no teacher call, so they are the cheapest data to train a judge on, and they train
exactly where a small model carries its judgment: the verdict token's probability.

Rows are deduplicated, mixed response : analysis = 4 : 1 by default (the majority kind is
subsampled), split by *pair* so no pair crosses train/dev/test, and rendered by the very
adapter the programs use at inference: the trained model sees exactly what it is served.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from reflectagent.calling.adapter import JudgeAdapter
from reflectagent.calling.budget import InputTooLong, render_request
from reflectagent.judging.modules import render_analysis
from reflectagent.judging.signatures import Analyze, Prefer, Reflect
from reflectagent.records.pairs import Pair
from reflectagent.records.results import Analysis, Judgment, flip
from reflectagent.records.splits import split_pairs
from reflectagent.serving.tokens import InputBudget

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """How traces become training data (each field is also a ``finetune`` CLI flag)."""

    ratio: float | None = field(default=4.0, metadata={"help": "response : analysis rows; None keeps every row"})
    rationalize: bool = field(
        default=True, metadata={"help": "fill (pair, order)s with no correct sample by rationalisation"}
    )
    fractions: str = field(default="0.8,0.1,0.1", metadata={"help": "train,dev,test shares, by pair"})
    seed: int = field(default=0, metadata={"help": "split, position and subsampling seed"})
    context_chars: int | None = field(
        default=None,
        metadata={"help": "input budget the rows are cut to, as inference cuts them; None: the teacher backend's own"},
    )
    min_text_chars: int = field(
        default=20, metadata={"help": "drop analyses/reflections shorter than this (degenerate)"}
    )
    min_distinct_trigrams: float = field(
        default=0.7,
        metadata={"help": "drop texts whose word trigrams are less than this share distinct (a small model's loops)"},
    )


@dataclass(frozen=True)
class Trace:
    """A labelled pair and the teacher's judgment of it (analyses in both orders, reflections)."""

    pair: Pair
    judgment: Judgment


def render_prompt(
    adapter: JudgeAdapter, signature, inputs: dict[str, str], budget: InputBudget | int | None
) -> list[dict]:
    """The chat messages inference sends for ``inputs`` (cut to the same budget as ``run_step``)."""
    return render_request(adapter, signature, inputs, budget)[2]


def _row(pair: Pair, kind: str, prompt: list[dict], target: str, rationalized: bool, **extra) -> dict[str, Any]:
    return {
        "pair_id": pair.id,
        "kind": kind,
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": target}],
        "rationalized": rationalized,
        "source": pair.source or "",
        "category": pair.category or "",
        **extra,
    }


def analysis_target(adapter: JudgeAdapter, analysis: Analysis, swapped: bool) -> str:
    """The assistant turn for ``analysis``, its verdict named in the order the pair was shown."""
    shown_verdict = flip(analysis.preference) if swapped else analysis.preference
    return adapter.render_target(Analyze, {"analysis": analysis.text, "preference": shown_verdict})


_PLACEHOLDER = re.compile(r"^\s*\{\w+\}\s*$")


def distinct_trigrams(text: str) -> float:
    """The share of a text's word trigrams that are distinct: 1.0 for prose, near 0 for a loop."""
    words = text.lower().split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(trigrams)) / len(trigrams) if len(trigrams) >= 5 else 1.0


def usable_text(text: str | None, config: DataConfig) -> bool:
    """Text worth training on: long enough, not the format's placeholder copied back (zero-shot
    SmolLM2 often answers "{analysis}"), and not a loop. A small teacher repeats one sentence
    until the length cap cuts it; trained on that, the student loops too and never closes its JSON."""
    return (
        bool(text)
        and len(text.strip()) >= config.min_text_chars
        and not _PLACEHOLDER.match(text)
        and distinct_trigrams(text) >= config.min_distinct_trigrams
    )


def correct(analysis: Analysis, label: str | None) -> bool:
    return analysis.parsed and analysis.preference == label


def response_rows(
    trace: Trace, adapter: JudgeAdapter, config: DataConfig, rationalizer=None, budget: InputBudget | None = None
) -> list[dict]:
    pair, rows = trace.pair, []
    for swapped in (False, True):
        shown = pair.swapped() if swapped else pair
        prompt = render_prompt(adapter, Analyze, shown.inputs(), budget or config.context_chars)
        right = [
            a
            for a in trace.judgment.analyses
            if a.swapped == swapped and correct(a, pair.label) and usable_text(a.text, config)
        ]
        rationalized = False
        if not right and config.rationalize and rationalizer is not None:
            made = rationalizer.analyse(pair, swapped)
            right, rationalized = ([made] if made and usable_text(made.text, config) else []), True
        for analysis in right:
            rows.append(
                _row(
                    pair,
                    "response",
                    prompt,
                    analysis_target(adapter, analysis, swapped),
                    rationalized,
                    order="BA" if swapped else "AB",
                )
            )
    return rows


def analysis_rows(
    trace: Trace,
    adapter: JudgeAdapter,
    config: DataConfig,
    rng: random.Random,
    rationalizer=None,
    budget: InputBudget | None = None,
) -> list[dict]:
    pair, judgment = trace.pair, trace.judgment
    analyses = judgment.analyses
    usable = [i for i, a in enumerate(analyses) if a.parsed and usable_text(a.text, config)]
    right = [i for i in usable if analyses[i].preference == pair.label]
    wrong = [i for i in usable if analyses[i].preference != pair.label]
    rows = []
    for good in right:
        for bad in wrong:
            first, second = (good, bad) if rng.random() < 0.5 else (bad, good)
            choice = "1" if first == good else "2"
            teacher = [
                r
                for r in judgment.reflections
                if (r.first, r.second) == (first, second) and r.more_reliable == good and usable_text(r.text, config)
            ]
            text, rationalized = (teacher[0].text, False) if teacher else (None, True)
            if text is None and config.rationalize and rationalizer is not None:
                text = rationalizer.reflect(pair, analyses[first], analyses[second], choice)
            if not usable_text(text, config):
                continue
            inputs = {
                **pair.inputs(),
                "analysis_1": render_analysis(analyses[first], False),
                "analysis_2": render_analysis(analyses[second], False),
            }
            prompt = render_prompt(adapter, Reflect, inputs, budget or config.context_chars)
            target = adapter.render_target(Reflect, {"reflection": text, "more_reliable": choice})
            rows.append(_row(pair, "analysis", prompt, target, rationalized, order=f"{first}-{second}"))
    return rows


def dpo_rows(trace: Trace, adapter: JudgeAdapter, config: DataConfig, budget: InputBudget | None = None) -> list[dict]:
    """STaR-DPO: for each order, (prompt, a right analysis, a wrong analysis) of the same prompt."""
    pair, rows = trace.pair, []
    for swapped in (False, True):
        shown = pair.swapped() if swapped else pair
        same = [a for a in trace.judgment.analyses if a.swapped == swapped and a.parsed and usable_text(a.text, config)]
        good = [a for a in same if a.preference == pair.label]
        bad = [a for a in same if a.preference != pair.label]
        prompt = render_prompt(adapter, Analyze, shown.inputs(), budget or config.context_chars)
        for g, b in zip(good, bad):
            rows.append(
                {
                    "pair_id": pair.id,
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": analysis_target(adapter, g, swapped)}],
                    "rejected": [{"role": "assistant", "content": analysis_target(adapter, b, swapped)}],
                }
            )
    return rows


def dedupe(rows: list[dict], key=("prompt", "completion")) -> list[dict]:
    seen, unique = set(), []
    for row in rows:
        signature = repr([row[k] for k in key if k in row] + [row.get("chosen"), row.get("rejected")])
        if signature not in seen:
            seen.add(signature)
            unique.append(row)
    return unique


def mix(responses: list[dict], analyses: list[dict], ratio: float | None, rng: random.Random) -> list[dict]:
    """Subsample the over-represented kind so that len(responses) : len(analyses) = ratio."""
    if ratio is None or not responses or not analyses:
        return responses + analyses
    if len(responses) > ratio * len(analyses):
        responses = rng.sample(responses, round(ratio * len(analyses)))
    else:
        analyses = rng.sample(analyses, max(1, round(len(responses) / ratio)))
    return responses + analyses


@dataclass
class UnifiedData:
    splits: dict[str, list[dict]]  # train/dev/test rows (mixed response + analysis preference)
    dpo: dict[str, list[dict]]
    pair_splits: dict[str, list[Pair]]
    stats: dict[str, Any]

    def to_datasets(self):
        """Hugging Face ``DatasetDict``s (chat-message prompt/completion; DPO prompt/chosen/rejected)."""
        import datasets

        def build(splits):
            return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items() if v})

        return build(self.splits), build(self.dpo)

    def save(self, folder) -> None:
        from pathlib import Path

        folder = Path(folder)
        unified, dpo = self.to_datasets()
        unified.save_to_disk(str(folder / "unified"))
        if dpo:
            dpo.save_to_disk(str(folder / "dpo"))
        import json

        (folder / "data_card.json").write_text(json.dumps(self.stats, indent=2))


def build_unified_data(
    traces: list[Trace],
    config: DataConfig | None = None,
    rationalizer=None,
    adapter: JudgeAdapter | None = None,
    concurrency: int = 1,
    budget: InputBudget | None = None,
) -> UnifiedData:
    """Rows from every trace; ``concurrency`` traces at once (rationalisation calls the teacher).

    Prompts are cut as the serving backend cuts them: to ``budget`` (its characters and tokens)
    where given, else to ``config.context_chars``. A pair whose prompt cannot fit at all gives no
    rows (counted in the card). Each pair's random choices come from its own seeded generator, so
    the rows of a pair do not depend on which other pairs are in the data or in what order they
    are built.
    """
    from reflectagent.calling.concurrency import run_all

    config = config or DataConfig()
    adapter = adapter or JudgeAdapter()
    labelled = [t for t in traces if t.pair.label in ("A", "B")]
    if len(labelled) < len(traces):
        logger.info("skipping %d traces without an A/B label", len(traces) - len(labelled))
    fractions = tuple(float(x) for x in config.fractions.split(","))
    pair_splits = split_pairs([t.pair for t in labelled], fractions=fractions, seed=config.seed)
    where = {p.id: name for name, pairs in pair_splits.items() for p in pairs}
    rng = random.Random(config.seed)
    splits, dpo, counts, too_long = {}, {}, Counter(), []
    for name in pair_splits:
        mine = [t for t in labelled if where.get(t.pair.id) == name]

        def rows_of(t: Trace):
            own = random.Random(f"{config.seed}:{t.pair.id}")
            try:
                return (
                    response_rows(t, adapter, config, rationalizer, budget),
                    analysis_rows(t, adapter, config, own, rationalizer, budget),
                )
            except InputTooLong as exc:
                logger.warning("pair %s gives no rows: %s", t.pair.id, exc)
                too_long.append(t.pair.id)  # list.append: safe from the worker threads
                return [], []

        built = run_all([lambda t=t: rows_of(t) for t in mine], max_workers=concurrency)
        responses = dedupe([r for made, _ in built for r in made])
        analyses = dedupe([r for _, made in built for r in made])
        counts.update(
            {
                f"{name}/response": len(responses),
                f"{name}/analysis": len(analyses),
                f"{name}/rationalized": sum(r["rationalized"] for r in responses + analyses),
            }
        )
        splits[name] = mix(responses, analyses, config.ratio, rng)
        rng.shuffle(splits[name])
        dpo[name] = dedupe([r for t in mine if t.pair.id not in too_long for r in dpo_rows(t, adapter, config, budget)])
    stats = {
        "config": asdict(config),
        "pairs": {k: len(v) for k, v in pair_splits.items()},
        "rows_before_mix": dict(counts),
        "pairs_too_long_for_the_context": len(too_long),
        "rows": {k: dict(Counter(r["kind"] for r in v)) for k, v in splits.items()},
        "dpo_rows": {k: len(v) for k, v in dpo.items()},
        "pairs_with_a_correct_sample": sum(
            any(correct(a, t.pair.label) for a in t.judgment.analyses) for t in labelled
        ),
    }
    return UnifiedData(splits=splits, dpo=dpo, pair_splits=pair_splits, stats=stats)


def verdict_rows(pair: Pair, adapter: JudgeAdapter, budget: InputBudget | int | None) -> list[dict]:
    """The pair's verdict alone (``Prefer``), as shown and swapped: the label in the order it is shown, so
    the two rows teach that position decides nothing."""
    rows = []
    for swapped in (False, True):
        shown = pair.swapped() if swapped else pair
        prompt = render_prompt(adapter, Prefer, shown.inputs(), budget)
        target = adapter.render_target(Prefer, {"preference": flip(pair.label) if swapped else pair.label})
        rows.append(_row(pair, "verdict", prompt, target, False, order="BA" if swapped else "AB"))
    return rows


def build_verdict_data(
    pairs: list[Pair],
    config: DataConfig | None = None,
    adapter: JudgeAdapter | None = None,
    budget: InputBudget | None = None,
) -> UnifiedData:
    """Verdict rows for every A/B-labelled pair, split by *prompt* (``config.fractions``, ``config.seed``).

    Every pair of one prompt lands in the same split, so the dev loss is not measured on a training
    prompt and nothing is thrown away (sets such as RM-Bench and PandaLM pair one prompt with several
    responses). Prompts are cut as the serving backend cuts them (``budget``, else ``config.context_chars``);
    a pair that cannot fit gives no rows and is counted in the card. Ties and unlabelled pairs are left out.
    """
    config = config or DataConfig()
    adapter = adapter or JudgeAdapter()
    labelled = [p for p in pairs if p.label in ("A", "B")]
    fractions = tuple(float(x) for x in config.fractions.split(","))
    first_of: dict[str, Pair] = {}
    for pair in labelled:  # one pair stands for its prompt in the split
        first_of.setdefault(pair.prompt, pair)
    where = {
        p.prompt: name
        for name, chosen in split_pairs(list(first_of.values()), fractions=fractions, seed=config.seed).items()
        for p in chosen
    }
    pair_splits = {name: [p for p in labelled if where.get(p.prompt) == name] for name in ("train", "dev", "test")}
    rng, splits, too_long = random.Random(config.seed), {}, 0
    for name, mine in pair_splits.items():
        rows = []
        for pair in mine:
            try:
                rows += verdict_rows(pair, adapter, budget or config.context_chars)
            except InputTooLong as exc:
                logger.warning("pair %s gives no rows: %s", pair.id, exc)
                too_long += 1
        splits[name] = dedupe(rows)
        rng.shuffle(splits[name])
    stats = {
        "config": asdict(config),
        "kind": "verdict",
        "pairs": {k: len(v) for k, v in pair_splits.items()},
        "pairs_left_out_unlabelled_or_tied": len(pairs) - len(labelled),
        "pairs_too_long_for_the_context": too_long,
        "pairs_left_out_with_a_repeated_id": sum(p.prompt not in where for p in labelled),
        "prompts": {k: len({p.prompt for p in v}) for k, v in pair_splits.items()},
        "rows": {k: dict(Counter(r["kind"] for r in v)) for k, v in splits.items()},
        "label_counts": dict(Counter(p.label for p in labelled)),
        "sources": dict(Counter(p.source or "" for p in labelled)),
    }
    return UnifiedData(splits=splits, dpo={name: [] for name in splits}, pair_splits=pair_splits, stats=stats)
