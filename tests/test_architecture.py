"""The package's shape is checked, not hoped for: layers, no private imports, thin commands."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmkl"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from lmkl... import ...`` in ``path`` (any depth)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmkl"):
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_contracts_hold(monkeypatch):
    """The [tool.importlinter] contracts of pyproject.toml: layers, no typer in the library, pure
    divergence math. (``lint-imports`` prints the broken import chains.)"""
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_private_names_cross_modules():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_name(path)
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != here:
                offenders.append(f"{here} imports {', '.join(private)} from {module}")
    assert not offenders, offenders


def test_commands_import_only_the_library_and_cli_helpers():
    offenders = []
    for path in sorted((PACKAGE / "cli" / "commands").glob("*.py")):
        for module, _ in _imports(path):
            if module.startswith("lmkl.cli.commands"):
                offenders.append(f"{path.name} imports {module}")
    assert not offenders, offenders


def test_every_subpackage_explains_itself():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 15, f"{init.parent.name}/__init__.py needs a docstring"


#: The engine's run kinds (and the base the two-model kinds share): each supplies its own
#: scoring and summary, and shares helpers only through neutral engine modules.
RUN_KINDS = ("token_compare", "bytes_compare", "sample_kl", "cache_build", "pair")


def test_run_kinds_do_not_import_one_another():
    offenders = []
    for name in RUN_KINDS:
        path = PACKAGE / "engine" / f"{name}.py"
        for module, _ in _imports(path) if path.exists() else []:
            other = module.rpartition(".")[2]
            base_of_pair_kinds = other == "pair" and name in ("bytes_compare", "sample_kl")
            kind = module.startswith("lmkl.engine.") and other in RUN_KINDS and other != name
            if kind and not base_of_pair_kinds:
                offenders.append(f"engine/{name}.py imports {module}")
    assert not offenders, offenders


def test_token_comparison_scores_without_asking_which_reference_it_has():
    """The reference sources (live model, exact cache, top-k cache) answer one protocol
    (lmkl.engine.reference); scoring a part never branches on which one is there."""
    tree = ast.parse((PACKAGE / "engine" / "token_compare.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TokenComparison")
    score = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "score")
    named = {
        node.attr
        for node in ast.walk(score)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if node.value.id == "self"
    }
    assert not named & {"cache", "topk", "ref_model"}, named & {"cache", "topk", "ref_model"}


def test_no_import_cycles_anywhere_in_the_package():
    """No two lmkl modules import each other, directly or through others, inside a subpackage
    or across them (lazy imports in function bodies count: they are cycles all the same)."""
    import grimp

    graph = grimp.build_graph("lmkl", cache_dir=None)
    modules = sorted(m for m in graph.modules if m.startswith("lmkl"))
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.find_modules_directly_imported_by(module):
            if not target.startswith("lmkl"):
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert not cycles, cycles
