"""Artifact I/O: atomic writes, sha256 checks and state-dict checkpoints with JSON sidecars.

Every artifact is written to a temporary file in the destination folder and renamed into place, so a
crash never leaves a half-written file under the final name. Checkpoints are plain state dicts (tensors
and basic containers) so they load with `torch.load(..., weights_only=True)`; descriptive metadata lives
in a JSON sidecar next to them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class ArtifactError(RuntimeError):
    """An artifact is missing, truncated or does not match its recorded checksum."""


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it into place only if the block succeeds."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold an flock() on `path` for the block; `on_wait()` runs first if another process holds it.

    The lock goes with its process, so a killed holder never leaves it stuck.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(destination: Path, text: str) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(destination)


def write_json_atomic(destination: Path, payload: Any) -> Path:
    return write_text_atomic(destination, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def on_cpu(value: Any) -> Any:
    """`value` with every tensor detached and moved to the CPU, so a GPU-made checkpoint loads anywhere."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def save_checkpoint(destination: Path, state: dict[str, Any], sidecar: dict[str, Any]) -> str:
    """Write a weights-only checkpoint and its JSON sidecar (which records the checkpoint's sha256)."""
    import torch

    with atomic_path(destination) as tmp:
        torch.save(on_cpu(state), tmp)
        digest = sha256_file(tmp)
    write_json_atomic(sidecar_path(destination), {**sidecar, "sha256": digest, "file": Path(destination).name})
    return digest


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, checking its sha256 against the sidecar (or caller)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; materialize the asset that writes it first")
    if expected_sha256 is None and sidecar_path(path).is_file():
        expected_sha256 = json.loads(sidecar_path(path).read_text()).get("sha256")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ArtifactError(
                f"checkpoint {path} has sha256 {actual[:12]}…, expected {expected_sha256[:12]}…: "
                "it was changed or truncated after it was written; re-materialize the asset that writes it"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ArtifactError(f"checkpoint {path} cannot be read ({exc}); re-materialize the asset") from exc


def read_sidecar(checkpoint: Path) -> dict[str, Any]:
    path = sidecar_path(checkpoint)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-materialize the asset that writes {Path(checkpoint).name}")
    return json.loads(path.read_text())
