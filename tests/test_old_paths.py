"""The core's modules moved into groups (``reflectagent/records``, ``serving``, ``calling``, ``judging``); every flat
path they had still imports, as the very same module object: code written against ``reflectagent.backends``,
``from reflectagent.steps import run_step``, a test's ``monkeypatch.setattr("reflectagent.steps.x", ...)``, a pickle
naming ``reflectagent.results``. The library itself imports the new paths; tests and benches may keep the old."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import reflectagent
from reflectagent.calling import steps

ROOT = Path(__file__).resolve().parents[1]
OLD = sorted(reflectagent.MOVED)


@pytest.mark.parametrize("old", OLD)
def test_a_flat_path_is_the_same_module_where_it_lives_now(old):
    group = reflectagent.MOVED[old]
    moved = importlib.import_module(f"reflectagent.{group}.{old}")
    assert importlib.import_module(f"reflectagent.{old}") is moved is sys.modules[f"reflectagent.{old}"]
    assert getattr(reflectagent, old) is moved  # as an attribute of the package too
    assert moved.__name__ == moved.__spec__.name == f"reflectagent.{group}.{old}"  # it keeps its own name
    assert (
        not (ROOT / "reflectagent" / f"{old}.py").exists() and (ROOT / "reflectagent" / group / f"{old}.py").is_file()
    )


def test_from_imports_and_monkeypatch_reach_the_module(monkeypatch):
    from reflectagent.steps import lm_identity, run_step

    assert run_step is steps.run_step and lm_identity is steps.lm_identity
    monkeypatch.setattr("reflectagent.steps.lm_identity", len)
    assert steps.lm_identity is len  # what arun_step calls by that name
    import reflectagent.backends as backends

    assert backends.resolve_backend is importlib.import_module("reflectagent.calling.backends").resolve_backend


def test_the_names_the_split_modules_had_are_still_theirs():
    """``models`` and ``backends`` lost code to ``serving.sources`` and ``serving.convert`` (below presets: no circle);
    every public name they had still imports from them (the benches import several)."""
    from reflectagent import backends, models
    from reflectagent.serving import convert, sources

    had = {
        models: [
            "DEFAULT_CONTEXT",
            "DEFAULT_DTYPE",
            "DONE_MARKER",
            "EMBEDDED_MODEL",
            "GGUF_DISTRIBUTION",
            "GGUF_FILE",
            "GGUF_PACKAGE",
            "ModelPreparationError",
            "SOURCE_FILE",
            "convert_gguf",
            "default_context",
            "default_dtype",
            "embedded_model_dir",
            "find_embedded_gguf",
            "is_prepared",
            "landing",
            "merge_lora",
            "prepare_model",
            "read_source",
        ],
        backends: [
            "Backend",
            "BackendLM",
            "TOKEN_MARGIN",
            "backend",
            "fingerprint",
            "model_identity",
            "remember_unpriced_models",
            "resolve_backend",
        ],
    }
    missing = [
        f"{module.__name__}.{name}" for module, names in had.items() for name in names if not hasattr(module, name)
    ]
    assert not missing, missing
    assert models.landing is sources.landing and models.merge_lora is convert.merge_lora
    assert backends.fingerprint is sources.fingerprint
    from reflectagent.config import ConfigError
    from reflectagent.errors import ConfigError as defined

    assert ConfigError is defined and reflectagent.ConfigError is defined


def test_a_fresh_process_loads_a_flat_path_first():
    """Nothing imported before it: the old name loads the module once, under its own name, and it reloads."""
    code = (
        "import importlib, sys\n"
        "import reflectagent.backends as old\n"
        "new = sys.modules['reflectagent.calling.backends']\n"
        "assert old is new and sys.modules['reflectagent.backends'] is new and old.__spec__.name == new.__name__\n"
        "assert importlib.reload(old) is new\n"
        "from reflectagent.models import prepare_model\n"
        "from reflectagent.serving.models import prepare_model as there\n"
        "assert prepare_model is there\n"
        "try:\n"
        "    import reflectagent.nowhere\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert exc.name == 'reflectagent.nowhere'\n"
        "else:\n"
        "    raise AssertionError('an unknown name imported')\n"
        "print('ok')\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


def test_a_pickle_naming_a_flat_path_loads():
    from reflectagent.records.results import Usage

    made = pickle.dumps(Usage(lm_calls=2), protocol=0)
    assert b"reflectagent.records.results" in made  # pickled where the class lives now
    old = made.replace(b"reflectagent.records.results", b"reflectagent.results")
    assert pickle.loads(old) == Usage(lm_calls=2)


def test_the_entry_points_and_package_data_resolve():
    """pyproject names the command (``reflectagent.cli:app``) and vLLM's plugin (``reflectagent.vllm_plugin:register``)
    by path, and lists every package: each resolves, and each folder of the core is packaged."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    targets = [
        *project["project"]["scripts"].values(),
        *(value for group in project["project"]["entry-points"].values() for value in group.values()),
    ]
    for target in targets:
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    packaged = set(project["tool"]["setuptools"]["packages"])
    folders = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "reflectagent").rglob("__init__.py")}
    assert folders <= packaged, folders - packaged
    from reflectagent.pairs import sample_pairs
    from reflectagent.presets import ADAPTERS_DIR, PRESETS

    assert len(sample_pairs()) == 32
    assert all(
        (ADAPTERS_DIR / p.adapter / "adapter_config.json").is_file() for p in PRESETS.values() if hasattr(p, "adapter")
    )
