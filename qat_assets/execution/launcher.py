"""The launcher of heavy worker processes: `python -m qat_assets.execution.worker STEP` through dagster-pipes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    Failure,
    MetadataValue,
    PipesSubprocessClient,
)
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported at the top level
from pydantic import BaseModel

from qat_assets.core.settings import Settings
from qat_assets.execution.gpu_slots import gpu_slot, parse_gpu_ids

LOG_TAIL_LINES = 25


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(the worker wrote no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class HeavyStepLauncher(ConfigurableResource):
    """Runs `python -m qat_assets.execution.worker STEP` through dagster-pipes, one GPU per worker.

    `gpu_ids` (default: QAT_GPU_IDS) lists the GPUs to share out; with it set and a CUDA device, each
    worker gets its own CUDA_VISIBLE_DEVICES and uses cuda:0 inside it.
    """

    gpu_ids: str = ""

    def run(self, context: AssetExecutionContext, step: str, request: BaseModel, out_dir: Path) -> dict[str, Any]:
        settings: Settings = request.settings  # every request carries the resolved settings
        log_file = out_dir / f"{step}_worker.log"
        gpu_ids = parse_gpu_ids(self.gpu_ids or os.environ.get("QAT_GPU_IDS", ""))
        wants_cuda = settings.device.startswith("cuda") or (not settings.device and bool(gpu_ids))
        env = {"YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False", "PYTHONUNBUFFERED": "1"}
        with gpu_slot(settings.artifact_root() / ".gpu_locks", gpu_ids if wants_cuda else []) as gpu_id:
            if gpu_id is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu_id
                request = request.model_copy(update={"settings": settings.model_copy(update={"device": "cuda:0"})})
                context.log.info(f"{step}: worker gets GPU {gpu_id} (CUDA_VISIBLE_DEVICES={gpu_id})")
            context.log.info(f"{step}: starting worker; its full log is {log_file}")
            try:
                invocation = PipesSubprocessClient().run(
                    context=context,
                    command=[sys.executable, "-m", "qat_assets.execution.worker", step, "--log-file", str(log_file)],
                    extras={"request": request.model_dump(mode="json")},
                    env=env,
                )
            except DagsterPipesExecutionError as exc:
                raise Failure(
                    description=f"the {step} worker died ({exc}); last lines of {log_file}:\n{log_tail(log_file)}",
                    metadata={"worker_log": MetadataValue.path(str(log_file))},
                ) from None
        messages = invocation.get_custom_messages()
        if not messages:
            raise Failure(description=f"the {step} worker exited without a result; see {log_file}")
        result = messages[-1]
        if "error" in result:
            raise Failure(
                description=f"{step} failed: {result['error']}",
                metadata={"worker_log": MetadataValue.path(str(log_file))},
            )
        return result
