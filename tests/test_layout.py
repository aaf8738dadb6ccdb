"""The layout's rules, checked by walking every module's imports: no cycle; the core knows no method;
ToyWorld knows only the core; no method imports another (shared pieces live in core, data or clip);
nothing in the library imports the web demo except the ``labkit app`` commands, lazily."""

import ast
import importlib
from pathlib import Path

import pytest

import labkit

ROOT = Path(labkit.__file__).parent
MODULES = sorted(".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in ROOT.rglob("*.py"))


def _imports(module: str, top_level_only: bool) -> set[str]:
    """The modules ``module`` imports (``from labkit.x import y`` counts ``labkit.x.y`` when it is a module)."""
    path = ROOT.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT.parent / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return found


def test_every_module_imports():
    for module in MODULES:
        importlib.import_module(module)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path that returns to where it started, or None (depth-first search)."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_module_level_imports_have_no_cycle():
    graph = {m: {i for i in _imports(m, top_level_only=True) if i in MODULES and i != "labkit"} for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _labkit_packages(module: str) -> set[str]:
    return {i.split(".")[1] for i in _imports(module, top_level_only=False)
            if i.startswith("labkit.") and i.split(".")[1] not in ("assets",)}


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(("labkit.core", "labkit.data"))])
def test_core_knows_no_method_and_toyworld_only_the_core(module):
    allowed = {"core"} if module.startswith("labkit.core") else {"core", "data"}
    assert _labkit_packages(module) <= allowed, f"{module} imports {_labkit_packages(module) - allowed}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in labkit.METHODS])
def test_no_method_imports_another(module):
    own = module.split(".")[1]
    others = _labkit_packages(module) & (set(labkit.METHODS) - {own})
    assert not others, f"{module} imports the method package(s) {others}"
    assert "cli" not in _labkit_packages(module), f"{module} imports the CLI, which sits above the library"


def test_the_shared_clip_and_the_exercise_engine_import_no_method():
    for module in MODULES:
        if module.startswith(("labkit.clip", "labkit.exercises")):
            assert not _labkit_packages(module) & set(labkit.METHODS), module


def test_only_the_app_commands_import_the_web_demo():
    for module in MODULES:
        uses_app = any(i == "app" or i.startswith("app.") for i in _imports(module, top_level_only=False))
        if module != "labkit.cli":
            assert not uses_app, f"{module} imports app/"
    assert not any(i.startswith("app") for i in _imports("labkit.cli", top_level_only=True))


def test_every_method_folder_has_the_same_file_roles():
    roles = {"__init__.py", "commands.py", "viz.py", "exercises.py", "exercise_notebooks.py"}  # + the method's own
    for method in labkit.METHODS:
        files = {p.name for p in (ROOT / method).glob("*.py")}
        assert roles <= files, f"labkit/{method} lacks {roles - files}"
