"""Code versions of the heavy steps: a sha256 over the source of the step's module and every core
module it imports, followed transitively through `from .x import` and `from qat_assets.core.x import` lines.

Derived rather than hand-bumped, so a change to QAT, QC or the trainer can never be forgotten: the
Dagster UI then marks the step's materializations stale. The files are read, not imported, so this
costs no torch import when the code location loads.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CORE_DIR = Path(__file__).parent
_CORE_IMPORT = re.compile(r"^\s*from (?:\.|qat_assets\.core\.)(\w+) import", re.MULTILINE)


def core_modules_used_by(module: str) -> list[str]:
    """`module` and the core modules it imports, directly or not, sorted by name."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(_CORE_IMPORT.findall((CORE_DIR / f"{name}.py").read_text(encoding="utf-8")))
    return sorted(seen)


def source_code_version(module: str) -> str:
    """sha256 (first 16 hex digits) over the names and sources of `core_modules_used_by(module)`."""
    digest = hashlib.sha256()
    for name in core_modules_used_by(module):
        digest.update(name.encode() + b"\0" + (CORE_DIR / f"{name}.py").read_bytes() + b"\0")
    return digest.hexdigest()[:16]
