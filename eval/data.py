"""Benchmarks as pairs: JSONL in the shared schema, or Hugging Face datasets on local disk.

RewardBench-style rows (prompt / chosen / rejected, a subset column) become pairs with the
chosen response placed in A or B by a stable hash of the row id, so labels are balanced
and the same on every machine. Splits are seeded, stratified and disjoint by construction:
each pair's split follows from a hash of (seed, id) within its stratum.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

from reflectagent.pairs import BadLine, InvalidPair, Pair, parse_pair, read_pairs

logger = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


def stable_fraction(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def from_chosen_rejected(row: dict, index: int, source: str) -> Pair:
    """A RewardBench-style row (prompt, chosen, rejected[, subset, id]) as a labelled pair."""
    missing = [k for k in ("prompt", "chosen", "rejected") if row.get(k) is None]
    if missing:
        raise InvalidPair(f"missing field(s): {', '.join(missing)}")
    pair_id = str(row.get("id", f"{source}-{index}"))
    chosen_first = stable_fraction("placement", pair_id) < 0.5
    a, b = (row["chosen"], row["rejected"]) if chosen_first else (row["rejected"], row["chosen"])
    category = row.get("subset") or row.get("category") or source
    return Pair(prompt=row["prompt"], response_a=a, response_b=b, id=pair_id,
                label="A" if chosen_first else "B", category=str(category), source=source)


def load_benchmark(path: str | Path, split: str | None = None) -> tuple[list[Pair], list[BadLine]]:
    """Pairs from a JSONL file, a ``datasets`` folder (``save_to_disk``) or a local data file.

    Rows may use the shared pair schema or RewardBench's chosen/rejected; bad rows are
    returned (with their row number) rather than dropped silently. Pairs without an id
    get ``<file stem>-<row>``; without a source, the file stem.
    """
    path = Path(path)
    if path.suffix == ".jsonl" and path.is_file():
        pairs, bad = read_pairs(path)
    else:
        rows = _dataset_rows(path, split)
        pairs, bad = [], []
        for index, row in enumerate(rows):
            try:
                pairs.append(from_chosen_rejected(row, index, path.stem) if "chosen" in row else parse_pair(row))
            except InvalidPair as exc:
                bad.append(BadLine(str(path), index + 1, str(exc)))
    stem = path.stem
    named = []
    for index, pair in enumerate(pairs):
        updates = {}
        if pair.id is None:
            updates["id"] = f"{stem}-{index}"
        if pair.source is None:
            updates["source"] = stem
        if pair.category is None:
            updates["category"] = pair.source or stem
        named.append(Pair(**{**pair.to_dict(), **updates}) if updates else pair)
    for line in bad:
        logger.warning("skipping %s", line)
    return named, bad


def _dataset_rows(path: Path, split: str | None) -> list[dict]:
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        kind = {".parquet": "parquet", ".json": "json", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: expected .jsonl, .json, .parquet, .csv or a datasets folder")
        loaded = datasets.load_dataset(kind, data_files=str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or ("test" if "test" in loaded else next(iter(loaded)))
        loaded = loaded[name]
    return list(loaded)


def split_pairs(pairs: list[Pair], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0,
                stratify: str = "source") -> dict[str, list[Pair]]:
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
