"""Security rules, each checked where it can break: servers bind loopback unless told otherwise, no
subprocess goes through a shell, config and saved programs are parsed as data (never code), and a path
written in a data file is text to judge, never a file to open. (A planted API key is searched for in
everything a run leaves behind in ``test_secrets.py``.)"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import dspy
import pytest
import typer
from fakes import ThreadEngine, fake_api_backend

from reflectagent.cli import app
from reflectagent.config import ConfigError, Settings, load_settings
from reflectagent.programs import GenRM, load_program
from reflectagent.server import ServerSpec

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["reflectagent", "programs", "eval", "finetune", "rl", "cli"]


def library_sources():
    for package in LIBRARY:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_server_binds_loopback_unless_told_otherwise():
    command = typer.main.get_command(app)
    hosts = {
        name: param.default for name, sub in command.commands.items() for param in sub.params if param.name == "host"
    }
    assert hosts == {"serve-rm": "127.0.0.1"}  # `serve` has no --host: its vLLM server is loopback only
    spec = inspect.signature(ServerSpec).parameters["host"].default
    assert spec == "127.0.0.1"


def test_no_subprocess_goes_through_a_shell_and_nothing_is_unpickled_or_evaluated():
    found = []
    for path in library_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "shell"
                and not (isinstance(node.value, ast.Constant) and node.value.value is False)
            ):
                found.append(f"{path}:{node.lineno}: shell=")
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in (
                    "os.system",
                    "os.popen",
                    "eval",
                    "exec",
                    "pickle.load",
                    "pickle.loads",
                    "yaml.load",
                    "yaml.unsafe_load",
                    "torch.load",
                    "cloudpickle.load",
                    "cloudpickle.loads",
                ):
                    found.append(f"{path}:{node.lineno}: {name}")
    assert found == []


def test_yaml_config_is_data_only(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("backends: !!python/object/apply:os.system ['echo owned > owned.txt']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config)
    assert not (tmp_path / "owned.txt").exists() and not Path("owned.txt").exists()


def test_a_saved_program_is_json_and_loads_as_state_only(tmp_path):
    path = GenRM(both_orders=True).save(tmp_path / "genrm.json")
    payload = json.loads(path.read_text())
    assert set(payload) == {"reflectagent", "options", "state"}
    payload["state"]["analyzer.predict"]["demos"] = [{"__reduce__": "os.system", "prompt": "p", "analysis": "a"}]
    path.write_text(json.dumps(payload))
    loaded = load_program(path)  # a demo is a dict of fields: nothing in it is called
    assert isinstance(loaded, GenRM) and loaded.options["both_orders"] is True


def test_a_path_in_a_data_file_is_text_to_judge_never_a_file_to_open(tmp_path, monkeypatch):
    from reflectagent.backends import resolve_backend
    from reflectagent.cache import JudgmentCache, use_cache

    secret = tmp_path / "secret.txt"
    secret.write_text("the-contents-of-a-private-file")
    monkeypatch.setenv("FAKE_KEY", "k")
    with ThreadEngine() as engine:
        settings = Settings(backends={"fake": fake_api_backend(engine.api_base)})
        with use_cache(JudgmentCache(tmp_path / "cache")), dspy.context(lm=resolve_backend("fake", settings)):
            judgment = GenRM()(prompt=f"Summarise {secret}", response_a=str(secret), response_b=f"file://{secret}")
    assert judgment.preference is not None
    [request] = engine.calls
    assert str(secret) in request and "the-contents-of-a-private-file" not in request
