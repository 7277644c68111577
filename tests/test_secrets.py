"""An API key never reaches disk or output: a planted key is searched for in everything a run leaves behind
(the judgment cache, judgments JSONL, eval report folder, saved program, stdout and stderr, logs)."""

from __future__ import annotations

import subprocess
import sys

from fakes import ThreadEngine as Engine

KEY = "sk-planted-7f3a9c1e5b"


def test_a_planted_api_key_appears_nowhere(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"id": "1", "prompt": "2+2?", "response_a": "4, right", "response_b": "5, wrong", "label": "A"}\n')
    with Engine(delay_s=0) as engine:
        config = tmp_path / "c.toml"
        config.write_text(f'[backends.api]\nmodel = "openai/fake"\napi_base = "{engine.api_base}"\napi_key_env = "PLANTED_KEY"\n'
                          'constrained = false\nlogprobs = false\nnum_retries = 0\n')
        env = {"PLANTED_KEY": KEY, "REFLECTAGENT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
        runs = [
            ["judge", data, "--backend", "api", "--program", "genrm-both", "-o", tmp_path / "out.jsonl"],
            ["eval", "--data", data, "--programs", "genrm-both", "--backends", "api", "-o", tmp_path / "report"],
        ]
        outputs = []
        for args in runs:
            done = subprocess.run([sys.executable, "-m", "reflectagent.cli", *map(str, args), "--config", str(config),
                                   "--cache-dir", str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            outputs += [done.stdout, done.stderr]
        saved = subprocess.run([sys.executable, "-c", (
            "from reflectagent.programs import GenRM; import reflectagent as ra, sys;\n"
            f"ra.backend('api', ra.load_settings(r'{config}')).__enter__(); GenRM().save(r'{tmp_path / 'program.json'}')")],
            env=env, capture_output=True, text=True, timeout=120)
        assert saved.returncode == 0, saved.stderr[-2000:]
    assert engine.keys and all(key == f"Bearer {KEY}" for key in engine.keys)  # the key was in play
    assert '"preference": "A"' in (tmp_path / "out.jsonl").read_text()  # and the runs judged
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == [] and all(KEY not in text for text in outputs)
