"""The package's shape, checked on its source: calls go down the layers only, modules and signatures stay small.

A run's path is entry (``train.py``, ``launch.py``) -> ``run`` -> ``training`` -> ``data`` -> ``cap`` /
``compression`` / ``sparse`` -> ``ops`` -> ``runtime``. A module may import its own package and any package
below it, never one above it or beside it (lazy imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cap_ds"
LAYERS = {"runtime": 0, "ops": 1, "cap": 2, "compression": 2, "sparse": 2, "data": 3, "training": 4, "run": 5,
          "train": 6, "launch": 6, "integrations": 6}
MAX_LINES, MAX_PARAMETERS, MAX_TOP_LEVEL = 400, 8, 12


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def unit(path: Path) -> str:
    """The layer unit a file belongs to: its top-level package, or the entry module's name."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(tree: ast.AST, path: Path) -> set[tuple[str, int]]:
    """The cap_ds units a module imports (absolute or relative), with the line."""
    found = set()
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[:len(package_parts) - node.level + 1])
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            if names[0] == "cap_ds":  # from cap_ds import X
                names = [f"cap_ds.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cap_ds" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_top_level_is_the_architecture() -> None:
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= MAX_TOP_LEVEL, entries
    for entry in entries:
        if entry != "__init__.py":
            assert entry.removesuffix(".py") in LAYERS, f"cap_ds/{entry} has no layer in {LAYERS}"
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"cap_ds/{package.name}/__init__.py must say what it owns and may import"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    if path == PACKAGE / "__init__.py":
        return  # importing cap_ds registers the pruned-model classes (compression) with transformers
    own = unit(path)
    tree = ast.parse(path.read_text())
    upward = sorted(f"cap_ds.{target} (line {line})" for target, line in imported_units(tree, path)
                    if target != own and LAYERS.get(target, -1) >= LAYERS[own])
    assert not upward, f"{path.relative_to(PACKAGE.parent)} ({own}, layer {LAYERS[own]}) imports " \
                       f"{', '.join(upward)}: a layer may only import the ones below it"


def test_modules_and_signatures_stay_small() -> None:
    problems = []
    for path in modules():
        source = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if len(source.splitlines()) > MAX_LINES:
            problems.append(f"{name}: {len(source.splitlines())} lines (at most {MAX_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [x for x in (a.vararg, a.kwarg) if x]
                count = len([p for p in params if p.arg not in ("self", "cls")])
                if count > MAX_PARAMETERS:
                    problems.append(f"{name}:{node.lineno} {node.name}() takes {count} parameters "
                                    f"(at most {MAX_PARAMETERS})")
    assert not problems, "\n".join(problems)
