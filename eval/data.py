"""Benchmarks as pairs: JSONL in the shared schema, or Hugging Face datasets on local disk.

RewardBench-style rows (prompt / chosen / rejected, a subset column) become pairs with the
chosen response placed in A or B by a stable hash of the row id, so labels are balanced
and the same on every machine. Splits are :func:`reflectagent.records.splits.split_pairs`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from reflectagent.records.pairs import BadLine, InvalidPair, Pair, parse_pair, read_pairs
from reflectagent.records.reading import DEFAULT_LIMITS, PairFileError, ReadLimits, check_readable
from reflectagent.records.splits import stable_fraction

logger = logging.getLogger(__name__)


def from_chosen_rejected(row: dict, index: int, source: str) -> Pair:
    """A RewardBench-style row (prompt, chosen, rejected[, subset, id]) as a labelled pair."""
    missing = [k for k in ("prompt", "chosen", "rejected") if row.get(k) is None]
    if missing:
        raise InvalidPair(f"missing field(s): {', '.join(missing)}")
    pair_id = str(row.get("id", f"{source}-{index}"))
    chosen_first = stable_fraction("placement", pair_id) < 0.5
    a, b = (row["chosen"], row["rejected"]) if chosen_first else (row["rejected"], row["chosen"])
    category = row.get("subset") or row.get("category") or source
    return Pair(
        prompt=row["prompt"],
        response_a=a,
        response_b=b,
        id=pair_id,
        label="A" if chosen_first else "B",
        category=str(category),
        source=source,
    )


def load_benchmark(
    path: str | Path, split: str | None = None, limits: ReadLimits = DEFAULT_LIMITS
) -> tuple[list[Pair], list[BadLine]]:
    """Pairs from a JSONL file, a ``datasets`` folder (``save_to_disk``) or a local data file.

    Rows may use the shared pair schema or RewardBench's chosen/rejected; bad rows are
    returned (with their row number) rather than dropped silently. Pairs without an id
    get ``<file stem>-<row>``; without a source, the file stem. JSONL (``.jsonl``, ``.jsonl.gz``) is read within
    ``limits``, as every pair file is; a device is refused whatever its name.
    """
    path = Path(path)
    if not path.is_dir():
        check_readable(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        pairs, bad = read_pairs(path, limits)
    else:
        rows = _dataset_rows(path, split)
        pairs, bad = [], []
        for index, row in enumerate(rows):
            try:
                pairs.append(from_chosen_rejected(row, index, path.stem) if "chosen" in row else parse_pair(row))
            except InvalidPair as exc:
                bad.append(BadLine(str(path), index + 1, str(exc)))
    stem = Path(path.name.removesuffix(".gz")).stem
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
            raise PairFileError(f"{path}: expected .jsonl, .json, .parquet, .csv or a datasets folder")
        loaded = datasets.load_dataset(kind, data_files=str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or ("test" if "test" in loaded else next(iter(loaded)))
        loaded = loaded[name]
    return list(loaded)
