"""The package's import graph, built from the source: no cycles (imports inside functions count,
``if TYPE_CHECKING:`` ones do not) and the stages import only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_model_stock

PACKAGE_DIR = Path(hf_model_stock.__file__).parent
# Every top-level module and folder, in the order of the data flow: a stage may import the ones
# before it, never one after it (imports inside functions included). A new module must take a place here.
STAGES = [
    "errors", "versions", "yaml_schema",  # cross-cutting leaves
    "methods", "io", "hub",  # the math; local files; the Hub (listings, headers, ranges, streamed shards)
    "eval_spec", "recipe",  # what to do: the evaluation spec (a leaf the recipe holds), the recipe
    "sources", "mergekit",  # resolve (local dir or Hub repo -> snapshot); mergekit configs and published merges -> a Recipe
    "merge", "publish", "pipeline",  # plan and execute -> write -> the library API
    "analysis", "evaluation", "workflow",  # inspect and training; scoring; the recipe workflow (merge, eval, push)
    "leaderboard", "study", "cli",  # many models; the quick demo and the study; the command line
]
MAX_TOP_LEVEL_MODULES = 10


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("hf_model_stock", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere in its code, outside TYPE_CHECKING blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import hf_model_stock.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from hf_model_stock.a import x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hf_model_stock.a\n")
    modules = {"hf_model_stock.a", "hf_model_stock.b", "hf_model_stock.c"}
    graph = {f"hf_model_stock.{n}": imports_of(tmp_path / f"{n}.py", modules) for n in "abc"}
    assert graph["hf_model_stock.c"] == set()
    assert find_cycle(graph) == ["hf_model_stock.a", "hf_model_stock.b", "hf_model_stock.a"]


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 60  # the walk saw the whole package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def stage_of(module: str) -> str | None:
    """The stage (top-level module or folder) of a package module; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a later stage, as 'module imports dependency'."""
    bad = []
    for mod, deps in sorted(graph.items()):
        here = stage_of(mod)
        for dep in sorted(deps):
            there = stage_of(dep)
            if here is not None and there is not None and STAGES.index(there) > STAGES.index(here):
                bad.append(f"{mod} imports {dep}")
    return bad


def test_every_module_has_a_stage():
    assert sorted({s for m in import_graph() if (s := stage_of(m)) is not None} - set(STAGES)) == []


def test_the_checker_flags_an_upward_import_inside_a_function(tmp_path):
    (tmp_path / "io.py").write_text("def f():\n    from hf_model_stock.recipe import Recipe\n")
    graph = {"hf_model_stock.io": imports_of(tmp_path / "io.py", {"hf_model_stock.io", "hf_model_stock.recipe"})}
    assert upward_imports(graph) == ["hf_model_stock.io imports hf_model_stock.recipe"]


def test_stages_import_only_earlier_stages():
    assert upward_imports(import_graph()) == []


def test_top_level_keeps_only_entry_points_and_cross_cutting_modules():
    top = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_package_exports_its_library_api_lazily():
    import subprocess
    import sys

    code = ("import sys, hf_model_stock as h; assert 'torch' not in sys.modules; "
            "print(*[getattr(h, n).__module__ for n in h.__all__[1:]])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [hf_model_stock._API[n] for n in hf_model_stock.__all__[1:]]
