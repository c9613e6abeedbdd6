"""What a step runs: its script and every project module and data file the script imports, transitively.

Both front ends declare these files as the step's dependencies, so editing the scoring code re-scores without
re-extracting, and a module nobody imports at run time reruns nothing. The imports are read from the source (an AST
walk, lazy imports inside functions included), never executed.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = "moralign"
SRC = Path(__file__).resolve().parents[1]  # src/moralign


def _module_file(module: str) -> Path | None:
    """The file of a ``moralign`` module or package, or None if ``module`` names something else."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SRC.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every ``moralign`` module a file imports, anywhere in it (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from moralign import extraction`: the name is a module too
            found |= {f"{node.module}.{a.name}" for a in node.names}
    modules = set()
    for name in found:
        if name.split(".")[0] != PACKAGE:
            continue
        # a module imports its parent packages' __init__ first
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            if _module_file(".".join(parts[:k])) is not None:
                modules.add(".".join(parts[:k]))
    return modules


_DATA_FILE = re.compile(r"""Path\(__file__\)\.with_name\(\s*["']([^"']+)["']\s*\)""")


def _data_files(path: Path) -> set[Path]:
    """Package data a module reads next to itself (``Path(__file__).with_name("x")``): a file, or a folder's files."""
    found = set()
    for name in _DATA_FILE.findall(path.read_text()):
        target = path.with_name(name)
        found |= {f for f in target.rglob("*") if f.is_file()} if target.is_dir() else {target}
    return found


@cache
def module_dependencies(module: str) -> frozenset[str]:
    """Files (relative to the repository root) that module ``module`` runs: itself, its imports, their data."""
    seen: set[str] = set()
    files: set[str] = set()
    stack = [module]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        files.add(path.relative_to(ROOT).as_posix())
        files |= {p.relative_to(ROOT).as_posix() for p in _data_files(path)}
        stack += sorted(_imports(path) - seen)
    return frozenset(files)


def script_dependencies(script: Path) -> set[str]:
    """Project files a step script runs (its ``moralign`` imports, transitively)."""
    files: set[str] = set()
    for module in _imports(script):
        files |= module_dependencies(module)
    return files
