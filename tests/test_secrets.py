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
        config.write_text(
            f'[backends.api]\nmodel = "openai/fake"\napi_base = "{engine.api_base}"\napi_key_env = "PLANTED_KEY"\n'
            "constrained = false\nlogprobs = false\nnum_retries = 0\n"
        )
        env = {"PLANTED_KEY": KEY, "REFLECTAGENT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
        runs = [
            ["judge", data, "--backend", "api", "--program", "genrm-both", "-o", tmp_path / "out.jsonl"],
            ["eval", "--data", data, "--programs", "genrm-both", "--backends", "api", "-o", tmp_path / "report"],
        ]
        outputs = []
        for args in runs:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "reflectagent.cli",
                    *map(str, args),
                    "--config",
                    str(config),
                    "--cache-dir",
                    str(tmp_path / "cache"),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            outputs += [done.stdout, done.stderr]
        saved = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "from reflectagent.programs import GenRM; import reflectagent as ra, sys;\n"
                    f"ra.backend('api', ra.load_settings(r'{config}')).__enter__(); GenRM().save(r'{tmp_path / 'program.json'}')"
                ),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert saved.returncode == 0, saved.stderr[-2000:]
    assert engine.keys and all(key == f"Bearer {KEY}" for key in engine.keys)  # the key was in play
    assert '"preference": "A"' in (tmp_path / "out.jsonl").read_text()  # and the runs judged
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == [] and all(KEY not in text for text in outputs)


DEAD = "http://127.0.0.1:{port}/v1"
TABLE = '[backends.api]\nmodel = "openai/fake"\napi_base = "{base}"\nconstrained = false\nlogprobs = false\nnum_retries = 0\n'
FAILING = [  # a key planted where a user might put it, or in play when the command fails; each command must fail
    ("in-the-table", "c.toml", TABLE + f'api_key = "{KEY}"\n', ["judge"]),
    ("in-extra", "c.toml", TABLE + f'api_key_env = "PLANTED_KEY"\nextra = {{ api_key = "{KEY}" }}\n', ["judge"]),
    ("as-the-variable-name", "c.toml", TABLE + f'api_key_env = "{KEY}"\n', ["judge"]),
    (
        "yaml-syntax-on-its-line",
        "c.yaml",
        f'backends:\n  api:\n    model: openai/fake\n    api_key: "{KEY}\n',
        ["judge"],
    ),
    ("backend-down-judge", "c.toml", TABLE + 'api_key_env = "PLANTED_KEY"\n', ["judge"]),
    ("backend-down-eval", "c.toml", TABLE + 'api_key_env = "PLANTED_KEY"\n', ["eval"]),
    ("in-the-table-serve-rm", "c.toml", TABLE + f'api_key = "{KEY}"\n', ["serve-rm"]),
]


def test_a_planted_key_appears_in_no_output_of_a_failing_command(tmp_path):
    """Every command here fails, at full verbosity (``-vv``, LiteLLM's debug log on): the key is in no line of
    stdout or stderr, and in no file the run left (its outputs, partial files, cache, logs) but the config."""
    from reflectagent.server import free_port

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"id": "1", "prompt": "2+2?", "response_a": "4, right", "response_b": "5, wrong", "label": "A"}\n')
    env = {
        "PLANTED_KEY": KEY,
        "REFLECTAGENT_HOME": str(tmp_path / "home"),
        "PATH": "/usr/bin:/bin",
        "LITELLM_LOG": "DEBUG",
    }
    leaks, configs = [], []
    for name, file_name, text, command in FAILING:
        folder = tmp_path / name
        folder.mkdir()
        config = folder / file_name
        config.write_text(text.replace("{base}", DEAD.format(port=free_port())))
        configs.append(config)
        args = {
            "judge": ["judge", data, "--backend", "api", "--program", "genrm-both", "-o", folder / "out.jsonl"],
            "eval": ["eval", "--data", data, "--programs", "genrm-both", "--backends", "api", "-o", folder / "report"],
            "serve-rm": ["serve-rm", "--backend", "api", "--port", str(free_port())],
        }[command[0]]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "reflectagent.cli",
                "-vv",
                *map(str, args),
                "--config",
                str(config),
                "--cache-dir",
                str(folder / "cache"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode != 0 and "Traceback" not in done.stderr, (name, done.stderr[-3000:])
        leaks += [f"{name}: stdout"] * (KEY in done.stdout) + [f"{name}: stderr"] * (KEY in done.stderr)
    leaks += [
        str(p) for p in tmp_path.rglob("*") if p.is_file() and p not in configs and KEY.encode() in p.read_bytes()
    ]
    assert leaks == []
