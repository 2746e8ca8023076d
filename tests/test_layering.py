"""The house rules of the package's layout, read from its source with ``ast``:

(a) no class over 200 lines and no function over 60 in ``protoknn_plugin/`` (decorators and
    docstrings included; benchmarks/ and tests/ are exempt);
(b) no module imports another module's ``_private`` name, in ``protoknn_plugin/`` and
    ``adapters/`` (shipped as ``protoknn_plugin.adapters``): neither ``from m import _x``, nor a
    private module ``m._y``, nor ``m._x`` on a package module bound by an import;
(c) outside ``adapters/``, no string test for ``"cabrnet:"`` (a comparison, or a ``startswith``-like
    call) and no import of the adapters.

The code does not follow these rules everywhere yet. Each rule therefore checks against an
explicit allow-list of the offenders that existed when the rule was written, each named below.
A test fails on any NEW offender, and also when an allow-listed offender is gone, so that the
lists only shrink: whoever fixes an offender deletes its entry in the same change, and nobody
adds one. A line count is not part of an entry, so an allow-listed offender that grows does not
fail here.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "protoknn_plugin"
# (folder in the repository, the dotted name it is imported as)
ROOTS = ((REPO / "protoknn_plugin", PACKAGE), (REPO / "adapters", f"{PACKAGE}.adapters"))
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 200, 60
STRING_TESTS = {"startswith", "endswith", "removeprefix", "partition", "rpartition", "split", "rsplit",
                "find", "index", "count", "replace"}

# ---- today's offenders: delete an entry when you fix it; never add one ----------------------

LARGE_CLASSES: Set[str] = set()

LONG_FUNCTIONS: Set[str] = set()

PRIVATE_IMPORTS: Set[str] = set()

CABRNET_OUTSIDE_ADAPTERS: Set[str] = set()


# ---- reading the source -------------------------------------------------------------------------

def modules() -> Iterator[Tuple[Path, str, str]]:
    """(file, its path relative to its root folder, its dotted module name) of every .py file."""
    for folder, dotted in ROOTS:
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield path, relative.as_posix(), ".".join([dotted, *parts])


def module_exists(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of this repository."""
    for folder, root in sorted(ROOTS, key=lambda r: -len(r[1])):
        if dotted == root or dotted.startswith(root + "."):
            rest = dotted[len(root):].lstrip(".").split(".") if dotted != root else []
            base = folder.joinpath(*rest) if rest else folder
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The dotted module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def with_parents(tree: ast.AST) -> ast.AST:
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent  # type: ignore[attr-defined]
    return tree


def parsed() -> List[Tuple[Path, str, str, ast.AST]]:
    return [(path, rel, dotted, with_parents(ast.parse(path.read_text(), str(path))))
            for path, rel, dotted in modules()]


SOURCES = parsed()


def qualified_definitions(tree: ast.AST) -> Iterator[Tuple[str, ast.AST]]:
    """(Outer.inner name, node) of every class and function, nested ones included."""
    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from visit(child, name + ".")
            else:
                yield from visit(child, prefix)
    yield from visit(tree, "")


def lines(node: ast.AST) -> int:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return node.end_lineno - first + 1


def size_offenders() -> Tuple[Dict[str, int], Dict[str, int]]:
    classes, functions = {}, {}
    for _, rel, dotted, tree in SOURCES:
        if not dotted.startswith(PACKAGE) or dotted.startswith(f"{PACKAGE}.adapters"):
            continue
        for name, node in qualified_definitions(tree):
            if isinstance(node, ast.ClassDef) and lines(node) > MAX_CLASS_LINES:
                classes[f"{rel}::{name}"] = lines(node)
            elif not isinstance(node, ast.ClassDef) and lines(node) > MAX_FUNCTION_LINES:
                functions[f"{rel}::{name}"] = lines(node)
    return classes, functions


def private_imports_of(rel: str, dotted: str, tree: ast.AST, is_package: bool) -> Set[str]:
    """``rel -> module._name`` for every private name this file takes from another module."""
    found: Set[str] = set()
    bound_modules: Dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith(PACKAGE):
                    continue
                parts = alias.name.split(".")
                found |= {f"{rel} -> {'.'.join(parts[:i + 1])}" for i, part in enumerate(parts) if is_private(part)}
                if alias.asname:
                    bound_modules[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, dotted, is_package)
            if not source.startswith(PACKAGE):
                continue
            parts = source.split(".")
            found |= {f"{rel} -> {'.'.join(parts[:i + 1])}" for i, part in enumerate(parts) if is_private(part)}
            for alias in node.names:
                if is_private(alias.name):
                    found.add(f"{rel} -> {source}.{alias.name}")
                elif module_exists(f"{source}.{alias.name}"):
                    bound_modules[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in bound_modules and is_private(node.attr):
            found.add(f"{rel} -> {bound_modules[node.value.id]}.{node.attr}")
    return found


def private_import_offenders() -> Set[str]:
    found: Set[str] = set()
    for path, rel, dotted, tree in SOURCES:
        root = "adapters/" if dotted.startswith(f"{PACKAGE}.adapters") else ""
        found |= private_imports_of(root + rel, dotted, tree, path.name == "__init__.py")
    return found


def enclosing(node: ast.AST) -> str:
    """Outer.inner name of the class or function around ``node``, or "<module>"."""
    names = []
    while hasattr(node, "parent"):
        node = node.parent
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
    return ".".join(reversed(names)) or "<module>"


def cabrnet_offenders() -> Set[str]:
    """``rel::where what`` for every "cabrnet:" string test and adapter import outside adapters/
    (named by the enclosing function, not the line, so that unrelated edits keep the names)."""
    adapters = f"{PACKAGE}.adapters"
    found: Set[str] = set()
    for path, rel, dotted, tree in SOURCES:
        if dotted.startswith(adapters):
            continue
        for node in ast.walk(tree):
            where = f"{rel}::{enclosing(node)}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "cabrnet:" in node.value:
                parent = node.parent
                tested = isinstance(parent, ast.Compare) or (
                    isinstance(parent, ast.Call) and node in parent.args and isinstance(parent.func, ast.Attribute)
                    and parent.func.attr in STRING_TESTS)
                if tested:
                    found.add(f'{where} tests "cabrnet:"')
            elif isinstance(node, ast.Import):
                found |= {f"{where} imports {a.name}" for a in node.names
                          if a.name == adapters or a.name.startswith(adapters + ".")}
            elif isinstance(node, ast.ImportFrom):
                source = absolute(node, dotted, path.name == "__init__.py")
                names = [f"{source}.{a.name}" for a in node.names]
                if any(n == adapters or n.startswith(adapters + ".") for n in [source, *names]):
                    found.add(f"{where} imports {source}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(adapters):
                found.add(f"{where} names {node.value}")
    return found


# ---- the rules ----------------------------------------------------------------------------------

def check_against(found, allowed: Set[str], rule: str, fix: str) -> None:
    new = sorted(set(found) - allowed)
    gone = sorted(allowed - set(found))
    shown = {name: found[name] for name in new} if isinstance(found, dict) else new
    assert not new, f"new offenders of the rule '{rule}': {shown}; {fix}"
    assert not gone, (f"fixed, so delete them from the allow-list in tests/test_layering.py "
                      f"(it only shrinks): {gone}")


def test_no_large_classes():
    classes, _ = size_offenders()
    check_against(classes, LARGE_CLASSES, f"classes under {MAX_CLASS_LINES} lines",
                  "split the class into parts with one job each")


def test_no_long_functions():
    _, functions = size_offenders()
    check_against(functions, LONG_FUNCTIONS, f"functions under {MAX_FUNCTION_LINES} lines",
                  "split the function into named steps")


def test_no_private_name_of_another_module_is_imported():
    check_against(private_import_offenders(), PRIVATE_IMPORTS, "no import of another module's _private name",
                  "make the name public in the module where it belongs")


def test_nothing_outside_the_adapters_knows_cabrnet():
    check_against(cabrnet_offenders(), CABRNET_OUTSIDE_ADAPTERS,
                  "no \"cabrnet:\" string test or adapter import outside adapters/",
                  "let the adapter register what it provides (heads, backends) instead")


# ---- the checker itself, on hand-written sources -------------------------------------------------

def _private_in(source: str, rel="benchmark/x.py", dotted=f"{PACKAGE}.benchmark.x") -> Set[str]:
    return private_imports_of(rel, dotted, with_parents(ast.parse(source)), is_package=False)


def test_checker_finds_private_names_however_they_are_imported():
    source = ("from ..figures import _num, public\n"
              "from .. import explain\n"
              "from . import tables as t\n"
              "import protoknn_plugin.transport as tr\n"
              "from os import _exit\n"
              "explain._forward_maps(1); t._row(); tr._solve(); explain.public(); self._mine()\n")
    assert _private_in(source) == {
        "benchmark/x.py -> protoknn_plugin.figures._num",
        "benchmark/x.py -> protoknn_plugin.explain._forward_maps",
        "benchmark/x.py -> protoknn_plugin.benchmark.tables._row",
        "benchmark/x.py -> protoknn_plugin.transport._solve",
    }
    assert _private_in("from ..train import __version__\nfrom .. import errors\nerrors.__name__\n") == set()


@pytest.mark.parametrize("source, offends", [
    ('if head.startswith("cabrnet:"):\n    pass\n', True),
    ('ok = name[:8] == "cabrnet:"\n', True),
    ('from ..adapters.cabrnet import baseline\n', True),
    ('import protoknn_plugin.adapters.cabrnet\n', True),
    ('importlib.import_module("protoknn_plugin.adapters.cabrnet")\n', True),
    ('click.option("--heads", help="cabrnet:protopnet runs CaBRNet\'s ProtoPNet")\n', False),
    ('print("use cabrnet:protopnet")\n', False),
])
def test_checker_finds_cabrnet_tests_and_adapter_imports(monkeypatch, source, offends):
    fake = [(REPO / "protoknn_plugin/benchmark/x.py", "benchmark/x.py", f"{PACKAGE}.benchmark.x",
             with_parents(ast.parse(source)))]
    monkeypatch.setitem(globals(), "SOURCES", fake)
    assert bool(cabrnet_offenders()) == offends


def test_checker_counts_decorators_and_nested_definitions():
    body = "\n".join(["    x = 1"] * 59)
    tree = ast.parse(f"@decorated\ndef f():\n{body}\n    def g():\n        pass\n")
    named = dict(qualified_definitions(tree))
    assert set(named) == {"f", "f.g"}
    assert lines(named["f"]) == 1 + 1 + 59 + 2 and lines(named["f.g"]) == 2


def test_an_allow_list_fails_on_a_new_offender_and_on_a_fixed_one():
    check_against({"a.py::A": 250}, {"a.py::A"}, "rule", "fix")
    with pytest.raises(AssertionError, match="new offenders.*b.py::B"):
        check_against({"a.py::A": 250, "b.py::B": 201}, {"a.py::A"}, "rule", "fix")
    with pytest.raises(AssertionError, match="delete them.*a.py::A"):
        check_against({}, {"a.py::A"}, "rule", "fix")
