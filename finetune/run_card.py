"""What a training job leaves beside its model: ``run_card.json``, read and written as one type.

Every trainer here (SFT, STaR-DPO, the Bradley-Terry baseline) writes a :class:`RunCard`;
the loop's report reads them back. Fields a job has no value for stay None.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunCard:
    config: dict[str, Any]  # the job's configuration, as given
    base_model: str
    steps: int
    seconds: float
    train_loss: float | None = None  # the trainer's mean over the run
    first_loss: float | None = None  # the first and last logged training losses
    final_loss: float | None = None
    eval_loss: float | None = None
    train_rows: int | None = None  # rows trained on (pairs, for the reward model)
    dropped_too_long: int | None = None  # rows left out because they exceed max_length
    dev_rows: int | None = None
    rows_by_kind: dict[str, int] = field(default_factory=dict)  # response / analysis preference rows
    bf16: bool | None = None
    resumed_from: str | None = None
    reward_accuracy: float | None = None  # DPO: share of pairs whose chosen reward beat the rejected

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / "run_card.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> RunCard:
        data = json.loads((Path(folder) / "run_card.json").read_text())
        if "train_pairs" in data:  # written before the card had one type
            data["train_rows"] = data.pop("train_pairs")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def losses(log_history: list[dict]) -> tuple[float | None, float | None, float | None]:
    """First and last training loss, and the last dev loss, from a ``transformers`` log history."""
    train = [e["loss"] for e in log_history if "loss" in e]
    dev = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    return (train[0] if train else None, train[-1] if train else None, dev[-1] if dev else None)
