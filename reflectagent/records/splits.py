"""Seeded, stratified, disjoint splits of pairs, stable on every machine.

Each pair's place follows from a hash of (seed, id) within its stratum, so a split does not
depend on file order or on which other pairs are present, and no pair can land in two
splits. Evaluation and training data both split here, so a pair held out of one is held
out of the other.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

from reflectagent.records.pairs import Pair

logger = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


def stable_fraction(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(
    pairs: list[Pair], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0, stratify: str = "source"
) -> dict[str, list[Pair]]:
    """Disjoint train/dev/test splits, stratified by ``stratify`` (a Pair attribute), stable under seed.

    Duplicate ids are kept once (the first), so no pair can land in two splits.
    """
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise ValueError("fractions must be non-negative and sum to 1")
    seen, unique = set(), []
    for pair in pairs:
        if pair.id in seen:
            logger.warning("duplicate pair id %s: keeping the first", pair.id)
            continue
        seen.add(pair.id)
        unique.append(pair)
    strata: dict[str, list[Pair]] = defaultdict(list)
    for pair in unique:
        strata[str(getattr(pair, stratify))].append(pair)
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    for members in strata.values():
        ordered = sorted(members, key=lambda p: stable_fraction(str(seed), p.id))
        cut_train = round(len(ordered) * fractions[0])
        cut_dev = cut_train + round(len(ordered) * fractions[1])
        splits["train"] += ordered[:cut_train]
        splits["dev"] += ordered[cut_train:cut_dev]
        splits["test"] += ordered[cut_dev:]
    return splits


def prompt_disjoint(pairs: list[Pair], held_out: list[Pair]) -> list[Pair]:
    """``pairs`` without those whose prompt is also a ``held_out`` pair's prompt.

    Splits go by pair, and some sets pair one prompt with several responses (RM-Bench: nine style
    variants of one comparison; PandaLM: about six pairs a prompt; HHH): a training pair that shares a
    test pair's prompt is often the test's own comparison in other words. Train on what this returns.
    """
    seen = {pair.prompt for pair in held_out}
    return [pair for pair in pairs if pair.prompt not in seen]
