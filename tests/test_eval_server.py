"""The eval end to end on the real embedded server: report numbers, plots, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reflectagent.cache import JudgmentCache
from reflectagent.config import BackendConfig, Settings
from reflectagent.eval import Record, load_benchmark, run_eval, summarize, write_report
from reflectagent.eval.report import compare

pytestmark = pytest.mark.server
DATA = Path(__file__).parent / "data"
FILES = [DATA / "eval_pandalm.jsonl", DATA / "eval_hhh.jsonl"]


def pairs_from(files, limit):
    pairs = []
    for path in files:
        loaded, bad = load_benchmark(path)
        assert not bad
        pairs += loaded[:limit]
    return pairs


def test_report_numbers_follow_from_the_per_pair_results(server, cache, tmp_path):
    pairs = pairs_from(FILES, 3)
    settings = Settings(backends={"embedded": BackendConfig(model="embedded", context_chars=4000)})
    results = run_eval(pairs, ["genrm", "reflectrm"], ["embedded"], settings=settings, progress=False)
    folder = write_report(
        results,
        tmp_path / "report",
        meta={"data": [str(f) for f in FILES], "pairs": len(pairs), "split": "all", "seed": 0},
    )
    report = json.loads((folder / "report.json").read_text())
    assert [(r["program"], r["backend"]) for r in report["runs"]] == [("genrm", "embedded"), ("reflectrm", "embedded")]
    for run in report["runs"]:
        records = [Record.from_dict(r) for r in run["records"]]
        assert len(records) == 6 and {r.category for r in records} == set(run["by_category"])
        assert json.loads(json.dumps(summarize(records).to_dict())) == run["overall"]  # every number recomputes
        right = sum(v == r.label for r in records for v in r.verdicts)
        assert run["overall"]["accuracy"]["value"] == pytest.approx(right / 12)
        assert run["overall"]["parse_failures"]["value"] == 0.0  # constrained decoding
    genrm, reflectrm = report["runs"]
    # reflectrm paired against the first run, genrm, pair by pair: recomputed from the two runs' records
    assert report["paired"]["baseline"] == {"program": "genrm", "backend": "embedded"}
    [paired] = report["paired"]["runs"]
    by_pair = {r["pair_id"]: r for r in genrm["records"]}
    deltas = [
        sum(v == r["label"] for v in r["verdicts"]) / 2
        - sum(v == by_pair[r["pair_id"]]["label"] for v in by_pair[r["pair_id"]]["verdicts"]) / 2
        for r in reflectrm["records"]
    ]
    assert paired["program"] == "reflectrm" and paired["n"] == 6 and paired["value"] == pytest.approx(sum(deltas) / 6)
    assert genrm["overall"]["cost_per_verdict"]["lm_calls"] == 1.0
    assert reflectrm["overall"]["cost_per_verdict"]["lm_calls"] == 4.0
    assert (folder / "plots" / "accuracy_by_category.png").stat().st_size > 5000
    assert (folder / "plots" / "accuracy_vs_cost.png").stat().st_size > 5000
    markdown = (folder / "report.md").read_text()
    assert "| genrm | embedded |" in markdown and "| reflectrm | embedded |" in markdown
    assert "## Paired against genrm @ embedded" in markdown
    assert "| genrm | embedded |" in compare(folder, folder)


def eval_command(cache_dir, out):
    return [
        sys.executable,
        "-m",
        "reflectagent.cli",
        "eval",
        "--programs",
        "genrm",
        "--concurrency",
        "1",
        "--data",
        ",".join(map(str, FILES)),
        "--out",
        str(out),
        "--cache-dir",
        str(cache_dir),
    ]


def test_a_killed_eval_resumes_to_the_same_report(server, tmp_path):
    env = {**os.environ, "REFLECTAGENT_EMBEDDED_URL": server.url}
    clean = subprocess.run(
        eval_command(tmp_path / "clean-cache", tmp_path / "clean"), env=env, capture_output=True, text=True, timeout=900
    )
    assert clean.returncode == 0, clean.stderr

    cache_dir = tmp_path / "cache"
    process = subprocess.Popen(
        eval_command(cache_dir, tmp_path / "resumed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        store = JudgmentCache(cache_dir)
        done = len(store) if cache_dir.exists() else 0
        store.close()
        if done >= 5:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = JudgmentCache(cache_dir)
    partial = len(store)
    store.close()
    assert 5 <= partial < 16 and not (tmp_path / "resumed" / "report.json").exists()

    resumed = subprocess.run(
        eval_command(cache_dir, tmp_path / "resumed"), env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())[0]
    assert run["cache_hits"] == partial and run["lm_calls_made"] == 16 - partial
    assert (
        json.loads((tmp_path / "resumed" / "report.json").read_text())["runs"]
        == json.loads((tmp_path / "clean" / "report.json").read_text())["runs"]
    )
