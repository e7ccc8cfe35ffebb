"""One GPU per heavy worker: an exclusive file lock per GPU id, held for the worker's lifetime.

The `gpu` pool bounds how many heavy steps run at once; this decides which GPU each one gets, so that
with the pool limit raised to the number of GPUs every worker sees exactly one of them through
`CUDA_VISIBLE_DEVICES`. Locks are flock()s held by the step process for as long as its worker runs:
a crashed step releases its GPU with its process, and a terminated step stops its worker first
(dagster-pipes forwards the termination), so a GPU is never held by an orphan.
"""

from __future__ import annotations

import fcntl
import glob
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def parse_gpu_ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if any(not part.isdigit() for part in ids):
        raise ValueError(f"QAT_GPU_IDS={text!r} must list GPU indices such as 0,1,2,3")
    return ids


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver shows this process. Without an NVIDIA device node it answers 0 without importing
    torch (the launcher runs in Dagster's run process, which a CPU-only machine keeps torch-free); with one,
    torch counts them through NVML (PYTORCH_NVML_BASED_CUDA_CHECK), creating no CUDA context."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        return 0
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.device_count()


def visible_gpus(environ: dict[str, str] | None = None, count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs a worker could be given: CUDA_VISIBLE_DEVICES' entries when it is set (as CUDA reads it: up to
    the first invalid entry, here an empty one or a negative index; they may be UUIDs, which a worker's
    CUDA_VISIBLE_DEVICES accepts as well), else every GPU the driver shows, as indices."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range((count or cuda_device_count)())]
    gpus = []
    for entry in (part.strip() for part in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def listed_or_visible_gpus() -> list[str]:
    """The GPUs heavy steps may use on this machine: QAT_GPU_IDS when set, else every visible one."""
    return parse_gpu_ids(os.environ.get("QAT_GPU_IDS", "")) or visible_gpus()


def gpus_to_share(
    configured: str, device: str, environ: dict[str, str] | None = None, count: Callable[[], int] | None = None
) -> tuple[list[str], str]:
    """The GPUs the local launcher shares out, one per heavy step, and why, for the step log.

    QAT_GPU_IDS (`configured`) when set, for a step that may use CUDA. Without it, every visible GPU when
    more than one is visible and the device leaves the choice open (`cuda` or empty): otherwise each step
    would land on the first GPU whatever the pool limit, and N steps at once would share one GPU while the
    others idle. A device naming one GPU (`cuda:N`) is the user's choice and is kept; one visible GPU needs
    no sharing out. Never asks the driver for a CPU step."""
    if device and not device.startswith("cuda"):
        return [], f"the device is {device!r}"
    ids = parse_gpu_ids(configured)
    if ids:
        return ids, f"QAT_GPU_IDS={configured}"
    if device not in ("", "cuda"):
        return [], f"QAT_DEVICE={device} names one GPU; every step runs there"
    visible = visible_gpus(environ, count)
    if len(visible) > 1:
        return visible, f"QAT_GPU_IDS is unset: sharing out the {len(visible)} visible GPUs {','.join(visible)}"
    return [], f"{len(visible)} GPU visible" if visible else "no GPU visible"


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
