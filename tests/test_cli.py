"""The ``reflectagent`` command as a user runs it, in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reflectagent.server import is_serving

DATA = Path(__file__).parent / "data"


def cli(*args, env=None, check=True):
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "reflectagent.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def test_help_explains_every_command():
    out = cli("--help").stdout
    for command in ("judge", "serve", "models", "cache"):
        assert command in out
    assert "--lora" in cli("serve", "--help").stdout
    assert "prepare" in cli("models", "--help").stdout


def test_input_errors_are_clear_and_exit_nonzero(tmp_path):
    result = cli("judge", check=False)
    assert result.returncode == 2 and "give exactly one of" in result.stderr
    result = cli("judge", "--prompt", " ", "--a", "x", "--b", "y", check=False)
    assert result.returncode == 2 and "the prompt is empty" in result.stderr
    result = cli("judge", tmp_path / "missing.jsonl", check=False)
    assert result.returncode == 2 and "no such file" in result.stderr
    config = tmp_path / "c.toml"
    config.write_text('[backends.x]\nmodel = "openai/gpt-4o"\n')
    result = cli("judge", "--sample", "--backend", "nope", "--config", config, check=False)
    assert result.returncode == 1 and "unknown backend 'nope'" in result.stderr


def test_an_eval_baseline_that_is_not_a_run_stops_before_judging(tmp_path):
    result = cli(
        "eval",
        "--data",
        DATA / "eval_hhh.jsonl",
        "--programs",
        "genrm,reflectrm",
        "--baseline",
        "mtbench",
        "-o",
        tmp_path / "report",
        "--cache-dir",
        tmp_path / "cache",
        check=False,
    )
    assert result.returncode == 2 and "--baseline 'mtbench' is not one of the runs" in result.stderr
    assert "--programs (genrm, reflectrm)" in result.stderr
    result = cli(
        "eval",
        "--data",
        DATA / "eval_hhh.jsonl",
        "--programs",
        "genrm",
        "--baseline",
        "genrm@api",
        "-o",
        tmp_path / "report",
        "--cache-dir",
        tmp_path / "cache",
        check=False,
    )
    assert result.returncode == 2 and "optionally @ one of --backends (embedded)" in result.stderr
    assert not (tmp_path / "report").exists() and not (tmp_path / "cache").exists()  # nothing judged, nothing written


def test_an_eval_baseline_by_program_and_backend_reaches_the_report(tmp_path):
    """The CLI's PROGRAM@BACKEND form is the one the report resolves (a fake engine stands in for the model:
    this is the flag's path, not judging; tests/test_eval_server.py pairs real runs)."""
    from fakes import ThreadEngine

    with ThreadEngine(delay_s=0) as engine:
        config = tmp_path / "c.toml"
        config.write_text(
            f'[backends.api]\nmodel = "openai/fake"\napi_base = "{engine.api_base}"\napi_key_env = "FAKE_KEY"\n'
            "constrained = false\nlogprobs = false\nnum_retries = 0\n"
        )
        cli(
            "eval",
            "--data",
            DATA / "eval_hhh.jsonl",
            "--limit",
            "2",
            "--programs",
            "genrm,genrm-both",
            "--backends",
            "api",
            "--baseline",
            "genrm-both @ api",
            "--config",
            config,
            "-o",
            tmp_path / "report",
            "--cache-dir",
            tmp_path / "cache",
            env={"FAKE_KEY": "k"},
        )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["paired"]["baseline"] == {"program": "genrm-both", "backend": "api"}
    assert [(r["program"], r["n"]) for r in report["paired"]["runs"]] == [("genrm", 2)]
    assert "## Paired against genrm-both @ api" in (tmp_path / "report" / "report.md").read_text()


def test_library_errors_are_one_line_not_a_traceback(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[backends\n")
    for args in (("cache", "info"), ("cache", "clear"), ("finetune", "data", "--data", DATA / "with_bad_lines.jsonl")):
        result = cli(*args, "--config", broken, check=False)
        assert result.returncode == 1, (args, result.stderr)
        assert "error:" in result.stderr and "not valid TOML" in result.stderr and "Traceback" not in result.stderr


def test_finetune_data_uses_the_configured_default_backend(tmp_path):
    """No --backend: the teacher is the config's default_backend (here a dead endpoint), not 'embedded'."""
    config = tmp_path / "c.toml"
    config.write_text(
        'default_backend = "teacher"\n[backends.teacher]\nmodel = "hosted_vllm/teacher"\n'
        'api_base = "http://127.0.0.1:9/v1"\nnum_retries = 0\ntimeout_s = 5\n'
    )
    result = cli(
        "finetune",
        "data",
        "--data",
        DATA / "with_bad_lines.jsonl",
        "--config",
        config,
        "--out",
        tmp_path / "out",
        "--cache-dir",
        tmp_path / "cache",
        check=False,
        env={"REFLECTAGENT_EMBEDDED_URL": ""},
    )
    assert result.returncode == 1 and "stopped after 0 of" in result.stderr
    assert "Connect" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "data_card.json").exists()


def test_duplicate_ids_are_named_and_a_dead_backend_stop_says_resume(tmp_path):
    """Duplicate ids get a warning (each pair is still judged); a dead endpoint stops the run with the advice
    to run again, which is right for it (the input is fine)."""
    data = tmp_path / "dup.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": "same", "prompt": "p", "response_a": "a", "response_b": str(i)}) + "\n" for i in range(2)
        )
    )
    config = tmp_path / "c.toml"
    config.write_text(
        '[backends.dead]\nmodel = "hosted_vllm/x"\napi_base = "http://127.0.0.1:9/v1"\nnum_retries = 0\n'
        "timeout_s = 5\ncontext_tokens = 4096\n"
    )
    result = cli("judge", data, "--backend", "dead", "--config", config, "--cache-dir", tmp_path / "cache", check=False)
    assert "1 id(s) name more than one pair ('same' x2)" in result.stderr
    assert result.returncode == 1 and "run the same command again to resume" in result.stderr


@pytest.mark.server
def test_judge_starts_the_embedded_server_stops_it_and_caches(server, tmp_path):
    """No server configured: the CLI starts one, judges, stops it; the re-run costs no calls."""
    cache_dir = tmp_path / "cache"
    env = {"REFLECTAGENT_EMBEDDED_URL": "", "REFLECTAGENT_SERVER_DIR": str(tmp_path / "server")}  # no server to find
    first = cli("judge", DATA / "with_bad_lines.jsonl", "--cache-dir", cache_dir, env=env)
    url = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", first.stdout).group(1)
    assert url != server.url and not is_serving(url)  # started for this run, gone with it
    assert "skipped" in first.stderr and "with_bad_lines.jsonl:3: not JSON" in first.stderr
    assert "with_bad_lines.jsonl:4: missing field(s): response_b" in first.stderr
    assert "pairs: 3 judged, 2 bad lines skipped" in first.stdout
    assert "LM calls: 6; cache hits: 0 of 3 judgments" in first.stdout
    assert "parse failures: 0 of 6 steps" in first.stdout

    out = tmp_path / "judgments.jsonl"
    second = cli(
        "judge",
        DATA / "with_bad_lines.jsonl",
        "--cache-dir",
        cache_dir,
        "-o",
        out,
        env={"REFLECTAGENT_EMBEDDED_URL": server.url},
    )
    assert "LM calls: 0; cache hits: 3 of 3 judgments (6 of 6 steps)" in second.stdout
    verdicts = lambda text: re.findall(r"^(\S+): verdict (.*?)(?:  label|$)", text, re.M)  # noqa: E731
    assert verdicts(second.stdout) == verdicts(first.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["judgment"]["analyses"]) == 2 for r in rows)

    assert "entries: 6" in cli("cache", "info", "--cache-dir", cache_dir).stdout
    assert "removed 6 entries" in cli("cache", "clear", "--cache-dir", cache_dir).stdout


@pytest.mark.server
def test_judge_one_pair_from_arguments(server, tmp_path):
    result = cli(
        "judge",
        "--prompt",
        "What is 2 + 2?",
        "--a",
        "4",
        "--b",
        "5",
        "--cache-dir",
        tmp_path,
        env={"REFLECTAGENT_EMBEDDED_URL": server.url},
    )
    assert re.search(r"^cli: verdict (A|B|none \(inconsistent across orders\))", result.stdout, re.M)
    assert re.search(r"\[A,B\] -> [AB] p=0\.\d\d", result.stdout) and re.search(r"\[B,A\] -> [AB]", result.stdout)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("--host 0.0.0.0", "--host in --vllm-args is set by `reflectagent serve` itself: it serves on loopback only"),
        (
            "--served_model_name=judge",
            "--served-model-name in --vllm-args is set by `reflectagent serve` itself: use --name",
        ),
        ("--max-num-seqs '16", "--vllm-args could not be split like a shell line (No closing quotation)"),
    ],
)
def test_serve_refuses_vllm_args_it_sets_itself_before_starting_anything(given, says):
    result = cli("serve", "--vllm-args", given, check=False)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


@pytest.mark.server
def test_serve_runs_until_interrupted_and_judges_reuse_it(lora_dir, tmp_path, monkeypatch):
    import signal
    import time

    import psutil

    from reflectagent.embedded import state_file

    isolated = {"REFLECTAGENT_EMBEDDED_URL": "", "REFLECTAGENT_SERVER_DIR": str(tmp_path / "server")}
    monkeypatch.setenv("REFLECTAGENT_SERVER_DIR", isolated["REFLECTAGENT_SERVER_DIR"])  # for state_file() below
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "reflectagent.cli", "serve", "--lora", f"test={lora_dir}", "--max-lora-rank", "8"),
            *("--vllm-args", "--max-num-seqs 4 --max-log-len=200"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **isolated},
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"^serving embedded \(.*\) at (http://127\.0\.0\.1:\d+/v1)$", line.strip())
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        url = match.group(1)
        assert is_serving(url, "embedded") and is_serving(url, "test")
        assert json.loads(state_file().read_text())["url"] == url
        [vllm] = [c.cmdline() for c in psutil.Process(process.pid).children() if "vllm" in " ".join(c.cmdline())]
        assert vllm[-3:] == ["--max-num-seqs", "4", "--max-log-len=200"]  # --vllm-args reached the server as given

        # An embedded backend with no URL configured finds this server instead of starting one.
        judged = cli(
            "judge", "--prompt", "Is water wet?", "--a", "Yes.", "--b", "No.", "--cache-dir", tmp_path, env=isolated
        )
        assert f"at {url}" in judged.stdout and "wall time" in judged.stdout
    finally:
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        code = process.wait(timeout=60)
    assert code == 0 and time.monotonic() - start < 60
    assert not is_serving(url) and not state_file().exists()


@pytest.mark.server
def test_finetune_data_distils_a_file_and_a_rerun_reproduces_it(server, tmp_path):
    """`finetune data`: teacher traces on the real server -> datasets, card and traces.jsonl; cached re-run = same data."""
    env = {"REFLECTAGENT_EMBEDDED_URL": server.url}
    args = (
        "finetune",
        "data",
        "--data",
        DATA / "with_bad_lines.jsonl",
        "--samples",
        "2",
        "--cache-dir",
        tmp_path / "cache",
        "--fractions",
        "1,0,0",
    )
    first = cli(*args, "--out", tmp_path / "one", env=env)
    assert "with_bad_lines.jsonl:3: not JSON" in first.stderr
    traces = [json.loads(line) for line in (tmp_path / "one" / "traces.jsonl").read_text().splitlines()]
    assert [t["pair"]["id"] for t in traces] == ["hhh-helpful-92", "hhh-harmless-46", "hhh-harmless-2"]
    assert all(len(t["judgment"]["analyses"]) == 2 and len(t["analysis_correct"]) == 2 for t in traces)
    card = json.loads((tmp_path / "one" / "data_card.json").read_text())
    assert card == json.loads(first.stdout[: first.stdout.rindex("}") + 1])
    assert (card["labels"], card["split"], card["split_seed"]) == ("the data files' own labels", "all", 0)
    cli(*args, "--out", tmp_path / "two", env=env)
    assert json.loads((tmp_path / "two" / "data_card.json").read_text()) == card
    again = [json.loads(line) for line in (tmp_path / "two" / "traces.jsonl").read_text().splitlines()]
    verdicts = lambda ts: [[(a["text"], a["preference"]) for a in t["judgment"]["analyses"]] for t in ts]  # noqa: E731
    assert verdicts(again) == verdicts(traces)
    assert all(a["cached"] for t in again for a in t["judgment"]["analyses"])
