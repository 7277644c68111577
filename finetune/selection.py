"""Which pairs the fine-tuning loop trains and evaluates on: disjoint, balanced, short enough.

``train`` and ``dev`` come from the training sources (``dev`` is held out by pair, and no training
pair shares a prompt with an evaluation pair), ``unseen`` from sources never trained on. Every choice is a stable hash of (seed, pair id), so the same
config picks the same pairs on every machine.
"""

from __future__ import annotations

import logging

from reflectagent.eval.data import load_benchmark
from reflectagent.finetune.loop_config import LoopConfig
from reflectagent.records.pairs import Pair
from reflectagent.records.splits import prompt_disjoint, split_pairs, stable_fraction

logger = logging.getLogger(__name__)


def usable(pair: Pair, max_chars: int) -> bool:
    """Labelled A or B, two different non-empty responses, and short enough to train on."""
    return (
        pair.label in ("A", "B")
        and not pair.identical
        and bool(pair.response_a.strip())
        and bool(pair.response_b.strip())
        and len(pair.prompt) + len(pair.response_a) + len(pair.response_b) <= max_chars
    )


def balanced(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """``n`` pairs taken in turn from each source, each source in a stable seeded order."""
    by_source: dict[str, list[Pair]] = {}
    for pair in sorted(pairs, key=lambda p: stable_fraction(str(seed), p.id)):
        by_source.setdefault(pair.source or "", []).append(pair)
    queues, chosen = [list(v) for _, v in sorted(by_source.items())], []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def one_per_prompt(pairs: list[Pair], seed: int) -> list[Pair]:
    """At most one pair a prompt, the first in a stable seeded order: sets such as RM-Bench and PandaLM pair one
    prompt with several responses, and the teacher file judges each AlpacaEval instruction for a dozen models.
    Breadth is in the prompts; a prompt's second pair mostly teaches that prompt again."""
    seen, kept = set(), []
    for pair in sorted(pairs, key=lambda p: stable_fraction(str(seed), p.id)):
        if pair.prompt not in seen:
            seen.add(pair.prompt)
            kept.append(pair)
    return kept


def longer_wins(pair: Pair) -> bool | None:
    """Whether the labelled response is the longer one (None when the two are the same length)."""
    if len(pair.response_a) == len(pair.response_b):
        return None
    return (len(pair.response_a) > len(pair.response_b)) == (pair.label == "A")


def one_per_prompt_length_balanced(pairs: list[Pair], seed: int) -> list[Pair]:
    """One pair a prompt, as :func:`one_per_prompt`, chosen so that the longer response is the better one in as close
    to half of them as the prompts allow. Preference data is rarely so: in the teacher file the longer response wins
    five times in six, and a judge trained on that learns to prefer length (the known failure of LLM judges that
    AlpacaEval's length-controlled win rate corrects for). A prompt with pairs of both kinds gives whichever kind the
    selection is short of; one with a single kind gives that; pairs of equal length count as neither."""
    by_prompt: dict[str, list[Pair]] = {}
    for pair in sorted(pairs, key=lambda p: stable_fraction(str(seed), p.id)):
        by_prompt.setdefault(pair.prompt, []).append(pair)
    kinds = {prompt: {longer_wins(p) for p in mine} for prompt, mine in by_prompt.items()}
    fixed = [0, 0]  # prompts that can only give a shorter-wins / a longer-wins pair
    for found in kinds.values():
        if found - {None} in ({False}, {True}):
            fixed[(found - {None}) == {True}] += 1
    flexible = [prompt for prompt, found in kinds.items() if {True, False} <= found]
    shorter_from_flexible = min(max((fixed[1] + len(flexible) - fixed[0]) // 2, 0), len(flexible))
    wanted = {prompt: False for prompt in flexible[:shorter_from_flexible]}
    wanted |= {prompt: True for prompt in flexible[shorter_from_flexible:]}
    kept = []
    for prompt, mine in by_prompt.items():
        if prompt in wanted:
            kept.append(next(p for p in mine if longer_wins(p) is wanted[prompt]))
        else:
            kept.append(next((p for p in mine if longer_wins(p) is not None), mine[0]))
    return sorted(kept, key=lambda p: stable_fraction(str(seed), p.id))


def _usable_pairs(files: list[str], max_chars: int) -> list[Pair]:
    pairs = []
    for name in files:
        loaded, bad = load_benchmark(name)
        if bad:
            logger.warning("%s: skipped %d malformed lines", name, len(bad))
        pairs += [p for p in loaded if usable(p, max_chars)]
    return pairs


def choose_pairs(config: LoopConfig) -> dict[str, list[Pair]]:
    """Disjoint train / dev (held out, same sources) / unseen (other sources) pairs."""
    candidates = _usable_pairs(config.files("train_data"), config.max_pair_chars)
    known = balanced(candidates, config.train_pairs + config.dev_pairs, config.seed)
    share = config.train_pairs / max(config.train_pairs + config.dev_pairs, 1)
    split = split_pairs(known, fractions=(share, 1 - share, 0.0), seed=config.seed)
    unseen = balanced(
        _usable_pairs(config.files("unseen_data"), config.max_pair_chars), config.unseen_pairs, config.seed
    )
    train = prompt_disjoint(split["train"], split["dev"] + unseen)
    overlap = {p.id for p in train} & {p.id for p in split["dev"] + unseen}
    if overlap:
        raise ValueError(f"{len(overlap)} pair ids are both in training and in evaluation: {sorted(overlap)[:5]}")
    logger.info(
        "pairs: %d train (%d more left out: they share a prompt with an evaluation pair), %d dev, %d unseen "
        "(training sources: %d usable pairs)",
        len(train),
        len(split["train"]) - len(train),
        len(split["dev"]),
        len(unseen),
        len(candidates),
    )
    return {"train": train, "dev": split["dev"], "unseen": unseen}
