"""Code versions of the heavy steps: a sha256 over the source of the step's module and of every
`qat_assets` module it imports, directly or not, found by parsing the imports with `ast`.

Derived rather than hand-bumped, so a change to QAT, QC, the exporter or the trainer can never be
forgotten: the Dagster UI then marks the step's materializations stale. Every import form counts
(`import qat_assets.core.x`, `from qat_assets.core import x`, `from qat_assets.core.x import y`,
`from . import x`, `from .x import y`, `from ..x import y`), including imports inside functions (the
lazy ones that keep torch out of the code location). The files are read, not imported, so this costs
no torch import when the code location loads.

A package's `__init__.py` counts only when a name is imported from it: following `qat_assets/__init__.py`
on every import would tie each step to the whole code location, which its lazy `code_location` imports.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "qat_assets"
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of `module` (dotted) when it is part of the package, else None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_name(base.name + ".py") if parts[1:] else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def imported_modules(module: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The package modules `module`'s source imports anywhere in it (each import statement resolved)."""
    path = module_file(module, package_dir)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # The package a relative import is relative to: the module's own package (itself, for an __init__.py).
    own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = own_package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            submodules = {f"{base}.{alias.name}" for alias in node.names}
            submodules = {name for name in submodules if module_file(name, package_dir) is not None}
            found.update(submodules)
            if len(submodules) < len(node.names):  # some names are defined by `base` itself
                found.add(base)
    return {name for name in found if module_file(name, package_dir) is not None}


def modules_used_by(module: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """`module` and the package modules it imports, directly or not, sorted by name."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(imported_modules(name, package_dir) - seen)
    return sorted(seen)


def source_code_version(core_module: str, package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 (first 16 hex digits) over the names and sources of the modules `qat_assets.core.<core_module>` uses."""
    digest = hashlib.sha256()
    for name in modules_used_by(f"{PACKAGE}.core.{core_module}", package_dir):
        digest.update(name.encode() + b"\0" + module_file(name, package_dir).read_bytes() + b"\0")
    return digest.hexdigest()[:16]
