"""The layers point one way: core <- programs <- eval <- finetune <- command line;
rl (rewards for trainers, and the reward service) sits beside eval, on programs.

Every module's imports are read from its source (lazy imports inside functions included),
so a shortcut taken anywhere fails here instead of in a review.
"""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import reflectagent

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # package -> the layers it may import
    "core": {"core"},
    "programs": {"core", "programs"},
    "eval": {"core", "programs", "eval"},
    "finetune": {"core", "programs", "eval", "finetune"},
    "rl": {"core", "programs", "rl"},
    "cli": {"core", "programs", "eval", "finetune", "rl", "cli"},
}
FOLDERS = {"reflectagent": "core", "programs": "programs", "eval": "eval", "finetune": "finetune", "rl": "rl", "cli": "cli"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "reflectagent":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS and parts[1] != "core" else "core"


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "reflectagent"}
    return names


def test_every_module_imports_only_its_own_layer_and_those_below():
    checked, wrong = 0, []
    for folder, layer in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            checked += 1
            for name in imported(path):
                target = layer_of(name)
                if target is not None and target not in LAYERS[layer]:
                    wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {name} ({target})")
    assert checked > 30
    assert not wrong, "\n".join(wrong)


def test_the_command_line_holds_no_service():
    """Commands stay thin: the reward service's web framework is imported in rl/, never in cli/."""
    web = {"fastapi", "starlette", "h11"}
    assert web & {n.split(".")[0] for n in imported(ROOT / "rl" / "service.py") | imported(ROOT / "rl" / "http.py")}
    in_cli = {f"{path.name}: {name}" for path in (ROOT / "cli").rglob("*.py") for name in imported(path) if name.split(".")[0] in web}
    assert not in_cli, in_cli


def test_the_checker_sees_a_wrong_direction(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from reflectagent.eval.runner import run_eval\n    import reflectagent.cli\n")
    assert {layer_of(n) for n in imported(bad)} == {"eval", "cli"}


def test_every_library_error_shares_one_base():
    errors, modules = [], []
    for package in ("reflectagent", "reflectagent.programs", "reflectagent.eval", "reflectagent.finetune"):
        path = importlib.import_module(package).__path__
        modules += [info.name for info in pkgutil.iter_modules(path, f"{package}.") if not info.ispkg]
    for name in modules:
        module = importlib.import_module(name)
        errors += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, Exception) and cls.__module__ == module.__name__]
    assert len(errors) >= 6
    assert all(issubclass(cls, reflectagent.ReflectAgentError) for cls in errors), errors


def test_the_package_exports_what_it_loads_lazily():
    """``__all__`` is spelled out (ruff reads it); it names exactly the lazily loaded names, each one there."""
    assert sorted(reflectagent.__all__) == sorted([*reflectagent._WHERE, "pairs"])
    assert len(set(reflectagent.__all__)) == len(reflectagent.__all__)
    assert all(getattr(reflectagent, name) is not None for name in reflectagent.__all__)
