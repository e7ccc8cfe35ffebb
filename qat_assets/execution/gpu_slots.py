"""One GPU per heavy worker: an exclusive file lock per GPU id, held for the worker's lifetime.

The `gpu` pool bounds how many heavy steps run at once; this decides which GPU each one gets, so that
with the pool limit raised to the number of GPUs every worker sees exactly one of them through
`CUDA_VISIBLE_DEVICES`. Locks are flock()s held by the step process for as long as its worker runs:
a crashed step releases its GPU with its process, and a terminated step stops its worker first
(dagster-pipes forwards the termination), so a GPU is never held by an orphan.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def parse_gpu_ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if any(not part.isdigit() for part in ids):
        raise ValueError(f"QAT_GPU_IDS={text!r} must list GPU indices such as 0,1,2,3")
    return ids


@contextmanager
def gpu_slot(lock_dir: Path, gpu_ids: list[str], wait_seconds: float = 3600.0) -> Iterator[str | None]:
    """Yield a free GPU id from `gpu_ids` (None when there are none to share out)."""
    if not gpu_ids:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        for gpu_id in gpu_ids:
            handle = open(lock_dir / f"gpu-{gpu_id}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield gpu_id
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no free GPU among {gpu_ids} for {wait_seconds:.0f}s; set the gpu pool limit to at most {len(gpu_ids)}"
            )
        time.sleep(2.0)
