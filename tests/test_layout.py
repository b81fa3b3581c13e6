"""Dependencies point one way (torchtune's rule): the papers' algorithms know nothing of the engine, the methods or
the command line; a method plug-in never reaches into the loop; no two modules import each other."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "greentrainer"
CORE = ["flops", "importance", "selection", "block_selection", "smt_layer"]
ENGINE = ("greentrainer.loop", "greentrainer.engine", "greentrainer.run", "greentrainer.cli", "greentrainer.demo",
          "greentrainer.callback")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, deferred: bool = True) -> set[str]:
    """Modules of this package that ``path`` imports (``deferred``: also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    nodes = ast.walk(tree) if deferred else tree.body
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:  # "from . import x" may name a module
                found.add(f"{target}.{alias.name}" if _is_module(f"{target}.{alias.name}") else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "greentrainer" or m.startswith("greentrainer.")}


def _is_module(name: str) -> bool:
    p = PACKAGE.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_core_algorithms_import_no_engine_method_or_cli():
    for name in CORE:
        bad = {m for m in imports(PACKAGE / f"{name}.py") if m.startswith(ENGINE + ("greentrainer.methods",
                                                                                     "greentrainer.config"))}
        assert not bad, f"greentrainer.{name} (a core algorithm) imports {sorted(bad)}"


def test_method_plug_ins_never_import_the_loop_or_the_engine():
    for name, path in all_modules().items():
        if name.startswith("greentrainer.methods"):
            bad = {m for m in imports(path) if m.startswith(ENGINE)}
            assert not bad, f"{name} (a method plug-in) imports {sorted(bad)}"


def test_no_import_cycles():
    """Between modules, counting deferred imports too (a cycle held together by imports inside functions is
    still a cycle). A package's __init__ re-exporting its own modules is not a cycle."""
    modules = all_modules()
    graph = {name: {m for m in imports(path) if m in modules and m != name
                    and not (path.name == "__init__.py" and m.startswith(name + "."))
                    and not (name.startswith(m + ".") and modules[m].name == "__init__.py")}
             for name, path in modules.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_checker_sees_a_deferred_import(tmp_path):
    """The checks above would pass vacuously if imports inside functions were missed."""
    assert "greentrainer.selection" in imports(PACKAGE / "flops.py")  # imported inside a method only
    assert "greentrainer.methods.registry" in imports(PACKAGE / "config.py", deferred=False)
