import json

import datasets
import pytest

from reflectagent.eval.data import load_benchmark
from reflectagent.splits import split_pairs
from reflectagent.pairs import Pair


def make_pairs(n, sources=("s1", "s2")):
    return [
        Pair(prompt=f"p{i}", response_a="a", response_b="b", id=f"{s}-{i}", label="AB"[i % 2], source=s, category=s)
        for s in sources
        for i in range(n)
    ]


def test_splits_are_disjoint_stratified_and_seeded():
    pairs = make_pairs(50)
    splits = split_pairs(pairs, seed=1)
    ids = {name: {p.id for p in part} for name, part in splits.items()}
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"])
    assert sum(map(len, ids.values())) == 100
    for name, size in (("train", 30), ("dev", 10), ("test", 10)):
        assert sum(p.source == "s1" for p in splits[name]) == size  # each source split the same way
    assert split_pairs(pairs, seed=1) == splits and split_pairs(pairs, seed=2) != splits
    # adding pairs never moves an existing pair to another split
    grown = split_pairs(pairs + make_pairs(10, sources=("s3",)), seed=1)
    assert {p.id for p in grown["test"] if p.source != "s3"} == ids["test"]
    with pytest.raises(ValueError):
        split_pairs(pairs, fractions=(0.5, 0.5, 0.5))


def test_rewardbench_style_dataset_on_disk(tmp_path):
    rows = [
        {
            "prompt": f"q{i}",
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
            "subset": "math" if i % 2 else "chat",
            "id": i,
        }
        for i in range(40)
    ]
    folder = tmp_path / "rb"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    pairs, bad = load_benchmark(folder)
    assert len(pairs) == 40 and not bad
    assert {p.category for p in pairs} == {"math", "chat"}
    for pair in pairs:
        good = pair.response_a if pair.label == "A" else pair.response_b
        assert good.startswith("good")
    assert 10 < sum(p.label == "A" for p in pairs) < 30  # placement by a stable hash: balanced


def test_bad_rows_in_a_data_file_are_reported(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "x"}]))
    pairs, bad = load_benchmark(path)
    assert len(pairs) == 1 and bad[0].line == 2 and "rejected" in bad[0].error
    assert pairs[0].id == "rows-0" and pairs[0].source == "rows"
