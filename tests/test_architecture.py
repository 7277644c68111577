"""The layers point one way: core <- programs <- eval <- finetune <- command line;
rl (rewards for trainers, and the reward service) sits beside eval, on programs.

Inside the core, its groups are layers too, bottom to top (``CORE_ORDER``):

- base: the top-level modules (``errors``, ``paths``, ``terminal``, ``vllm_plugin``), which every group uses;
- records: what flows in and out of a judge (pairs, results, output files), needing nothing else;
- serving: local model folders and vLLM servers, which know no pairs and no backends;
- calling: settings, backends, the cache, the one step call, which read records and start or count on servers;
- judging: signatures, modules, the judge, which call backends.

Every module's imports are read from its source, those inside functions (and ``if TYPE_CHECKING:``) included: a
lazy import is still a dependency, and hiding one in a function is how the core's old circle (models <-> presets,
presets -> backends) was held together. A shortcut taken anywhere fails here instead of in a review. The package's
front door (``reflectagent/__init__.py``) is the one module exempt: it re-exports from every layer.
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
FOLDERS = {
    "reflectagent": "core",
    "programs": "programs",
    "eval": "eval",
    "finetune": "finetune",
    "rl": "rl",
    "cli": "cli",
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "reflectagent":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS and parts[1] != "core" else "core"


def imported(path: Path, module: str | None = None, source: str | None = None) -> set[str]:
    """The modules a source imports, anywhere in it; relative imports resolved against ``module`` (its dotted name).
    ``from reflectagent import X`` counts as ``reflectagent.X`` (X may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up (a package's __init__ is its own package)
                parts = module.split(".") if module else []
                package = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, *([base] if base else [])])
                names |= {f"{base}.{alias.name}" for alias in node.names}  # from . import x: x may be a module
            if base:
                names.add(base)
                names |= {f"{base}.{alias.name}" for alias in node.names if base == "reflectagent"}
    return names


def module_name(path: Path) -> str:
    """A library file's dotted name: ``reflectagent/calling/steps.py`` -> ``reflectagent.calling.steps``."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = ["reflectagent"] if folder == "reflectagent" else ["reflectagent", folder]
    parts += [part for part in rest if part != "__init__"]
    return ".".join(parts)


CORE_ORDER = ("base", "records", "serving", "calling", "judging")  # bottom to top: see the module's docstring


def core_layer(name: str) -> str | None:
    """The core layer of an imported name (None outside the core): its group, ``base`` for the top-level modules.
    A flat name the core had before it was grouped (``reflectagent.steps``) counts where it points now."""
    if layer_of(name) != "core":
        return None
    parts = name.split(".")
    group = reflectagent.MOVED.get(parts[1], parts[1]) if len(parts) > 1 else "base"
    return group if group in CORE_ORDER else "base"


def upward_imports(module: str, source: str) -> list[str]:
    """What ``module`` (a core module's dotted name) imports from a layer above its own, anywhere in ``source``."""
    own = CORE_ORDER.index(core_layer(module))
    return sorted(
        name
        for name in imported(Path(module), module, source)
        if core_layer(name) is not None and CORE_ORDER.index(core_layer(name)) > own
    )


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
    in_cli = {
        f"{path.name}: {name}"
        for path in (ROOT / "cli").rglob("*.py")
        for name in imported(path)
        if name.split(".")[0] in web
    }
    assert not in_cli, in_cli


def test_the_checker_sees_a_wrong_direction(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from reflectagent.eval.runner import run_eval\n    import reflectagent.cli\n")
    assert {layer_of(n) for n in imported(bad)} == {"eval", "cli"}


def core_modules() -> dict[str, Path]:
    """Every module of the core but its front door, by dotted name."""
    return {
        module_name(path): path
        for path in sorted((ROOT / "reflectagent").rglob("*.py"))
        if path != ROOT / "reflectagent" / "__init__.py"
    }


def test_the_core_imports_only_its_own_layer_and_those_below():
    groups = {path.parent.name for path in (ROOT / "reflectagent").glob("*/__init__.py")}
    assert groups == set(CORE_ORDER[1:]), "a new group of the core takes its place in CORE_ORDER"
    modules = core_modules()
    wrong = {
        f"{name} ({core_layer(name)})": upward
        for name, path in modules.items()
        if (upward := upward_imports(name, path.read_text()))
    }
    assert len(modules) > 25 and {core_layer(name) for name in modules} == set(CORE_ORDER)
    assert not wrong, wrong


def test_the_checker_sees_an_upward_import_inside_the_core():
    """Fed made-up sources: an import into a higher layer is seen at the top of a module, inside a function, through
    a flat name the core had before (the old circle: presets importing backends), relatively, and from the base."""
    cases = {
        ("reflectagent.records.pairs", "def f():\n    from reflectagent.calling.steps import run_step\n"): [
            "reflectagent.calling.steps"
        ],
        ("reflectagent.serving.models", "import os\nimport reflectagent.judging.judge\n"): [
            "reflectagent.judging.judge"
        ],
        ("reflectagent.serving.presets", "def _tuned():\n    from reflectagent.backends import fingerprint\n"): [
            "reflectagent.backends"
        ],
        ("reflectagent.records.output", "from ..calling import cache\n"): [
            "reflectagent.calling",
            "reflectagent.calling.cache",
        ],
        ("reflectagent.errors", "from reflectagent import pairs\n"): ["reflectagent.pairs"],
        ("reflectagent.judging.judge", "from reflectagent.calling.cache import caching\nfrom . import modules\n"): [],
        ("reflectagent.calling.steps", "from reflectagent.serving.tokens import InputBudget\nimport dspy\n"): [],
    }
    for (module, source), upward in cases.items():
        assert upward_imports(module, source) == upward, (module, source)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> the modules it imports), one path each."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_core_has_no_import_circle():
    """No module of the core reaches itself through its imports, function-level ones included (``models`` ->
    ``presets`` -> ``models`` was held together by imports placed inside functions)."""
    modules = core_modules()

    def module_of(name: str) -> str | None:
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in reflectagent.MOVED:
            parts[1:2] = [reflectagent.MOVED[parts[1]], parts[1]]
        for end in (len(parts), len(parts) - 1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    graph = {
        name: {target for imported_name in imported(path, name) if (target := module_of(imported_name))} - {name}
        for name, path in modules.items()
    }
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]  # the finder finds one
    assert cycles(graph) == []


def test_every_library_error_shares_one_base():
    errors, modules = [], []
    packages = [
        "reflectagent",
        *(f"reflectagent.{group}" for group in CORE_ORDER[1:]),
        "reflectagent.programs",
        "reflectagent.eval",
        "reflectagent.finetune",
    ]
    for package in packages:
        path = importlib.import_module(package).__path__
        modules += [info.name for info in pkgutil.iter_modules(path, f"{package}.") if not info.ispkg]
    for name in modules:
        module = importlib.import_module(name)
        errors += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Exception) and cls.__module__ == module.__name__
        ]
    assert len(errors) >= 6
    assert all(issubclass(cls, reflectagent.ReflectAgentError) for cls in errors), errors


def test_the_package_exports_what_it_loads_lazily():
    """``__all__`` is spelled out (ruff reads it); it names exactly the lazily loaded names, each one there."""
    assert sorted(reflectagent.__all__) == sorted([*reflectagent._WHERE, "pairs"])
    assert len(set(reflectagent.__all__)) == len(reflectagent.__all__)
    assert all(getattr(reflectagent, name) is not None for name in reflectagent.__all__)
