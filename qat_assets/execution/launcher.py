"""The launcher of heavy workers: `python -m qat_assets.execution.worker STEP` through an injected Pipes client.

Locally (`PipesSubprocessClient`) the worker is a subprocess that takes a GPU with the file lock in
gpu_slots.py and writes its output to a log file. On Ray (`PipesRayJobClient`) it is a Ray job that
asks the cluster for the GPU it needs; Ray places it and the job's own log holds its output. Either
way the worker's log lines, per-epoch progress and final result come back through dagster-pipes, and
a worker that dies fails only its step, with the tail of its log.
"""

# No `from __future__ import annotations`: Dagster reads the ResourceDependency annotation at runtime.
import os
import sys
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    Failure,
    MetadataValue,
    PipesClient,
    PipesClientCompletedInvocation,
    ResourceDependency,
)
from pydantic import BaseModel

from qat_assets.core.settings import Settings
from qat_assets.execution.gpu_slots import gpu_slot, gpus_to_share, visible_gpus
from qat_assets.execution.heavy_step_slots import available_cores, cpu_threads_per_step
from qat_assets.execution.pipes_clients import launcher_kind
from qat_assets.execution.ray_jobs import RayStep
from qat_assets.execution.warm_client import ping, socket_path
from qat_assets.execution.worker import WORKER_ENV, WORKER_THREADS_ENV

LOG_TAIL_LINES = 25


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(the worker wrote no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def worker_command(storage: Path, step: str, log_file: Path, on_cuda: bool) -> tuple[list[str], Path | None]:
    """The local worker's command line, and the warm server it forks from: the one serving `storage` when one
    answers (warm_server.py; no 6-7 s of imports), else None and a cold `python -m qat_assets.execution.worker`.

    A step `on_cuda` always runs cold: a few seconds of imports are nothing beside hours on a GPU, and a fresh
    process rules out any CUDA state a fork of the preloaded server could inherit."""
    worker_argv = [step, "--log-file", str(log_file)]
    server = socket_path(storage)
    if not on_cuda and ping(server) is not None:
        return [sys.executable, "-m", "qat_assets.execution.warm_client", str(server), *worker_argv], server
    return [sys.executable, "-m", "qat_assets.execution.worker", *worker_argv], None


class HeavyStepLauncher(ConfigurableResource):
    """Runs `python -m qat_assets.execution.worker STEP` through `pipes_client`, one GPU per worker.

    `pipes_client` is chosen per deployment by `pipes_client_for(settings)` (QAT_LAUNCHER). On the local
    path, `gpu_ids` (default: QAT_GPU_IDS, else every visible GPU when more than one is: gpu_slots.gpus_to_share)
    lists the GPUs to share out with the file lock; on Ray the cluster places each job on a GPU itself.
    """

    pipes_client: ResourceDependency[PipesClient]
    gpu_ids: str = ""

    def run(self, context: AssetExecutionContext, step: str, request: BaseModel, out_dir: Path) -> dict[str, Any]:
        settings: Settings = request.settings  # every request carries the resolved settings
        kind = launcher_kind(self.pipes_client)
        if settings.launcher != kind:
            raise Failure(
                description=f"this code location runs heavy steps with the {kind!r} launcher (QAT_LAUNCHER when it "
                f"loaded), but the run's settings ask for {settings.launcher!r}; the launcher is a deployment "
                "choice: set QAT_LAUNCHER (and QAT_RAY_ADDRESS) where the code location runs, not in run config"
            )
        log_file = out_dir / f"{step}_worker.log"
        if kind == "ray":
            invocation, execution = self._run_on_ray(context, step, request, log_file)
        else:
            invocation, execution = self._run_locally(context, step, request, log_file)
        messages = invocation.get_custom_messages()
        if not messages:
            raise Failure(description=f"the {step} worker exited without a result; see {log_file}")
        result = dict(messages[-1])
        # Where the worker really ran (a warm server may refuse a request, which the client then runs cold) and
        # on how many torch threads.
        execution = {**execution, **result.pop("worker_origin", {})}
        if "error" in result:
            raise Failure(
                description=f"{step} failed: {result['error']}",
                metadata={"worker_log": MetadataValue.path(str(log_file))},
            )
        return {**result, "execution": execution}

    def _run_locally(
        self, context: AssetExecutionContext, step: str, request: BaseModel, log_file: Path
    ) -> tuple[PipesClientCompletedInvocation, dict[str, Any]]:
        settings: Settings = request.settings
        gpu_ids, why_gpus = gpus_to_share(self.gpu_ids or os.environ.get("QAT_GPU_IDS", ""), settings.device)
        # An empty device picks the first GPU if any: such a step runs on CUDA as surely as a `cuda` one.
        on_cuda = bool(gpu_ids) or settings.device.startswith("cuda") or (not settings.device and bool(visible_gpus()))
        env = dict(WORKER_ENV)
        with gpu_slot(settings.artifact_root() / ".gpu_locks", gpu_ids) as gpu_id:
            if gpu_id is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu_id
                request = request.model_copy(update={"settings": settings.model_copy(update={"device": "cuda:0"})})
                context.log.info(f"{step}: worker gets GPU {gpu_id} (CUDA_VISIBLE_DEVICES={gpu_id}; {why_gpus})")
            elif on_cuda:
                context.log.info(f"{step}: worker runs on CUDA without a GPU of its own ({why_gpus})")
            else:
                threads, why = self._cpu_share(context)
                env[WORKER_THREADS_ENV] = str(threads)
                context.log.info(f"{step}: worker gets {threads} of {available_cores()} CPU cores: {why}")
            command, server = worker_command(settings.artifact_root(), step, log_file, on_cuda)
            how = (f"asking the warm worker server at {server} to fork it" if server
                   else "cold: the step runs on CUDA" if on_cuda else "cold: no warm worker server runs")
            context.log.info(f"{step}: starting worker ({how}); its full log is {log_file}")
            try:
                invocation = self.pipes_client.run(
                    context=context,
                    command=command,
                    extras={"request": request.model_dump(mode="json")},
                    env=env,
                )
            # The client raises a private error type when the process exits non-zero; its message has the code.
            except Exception as exc:
                raise Failure(
                    description=f"the {step} worker died ({exc}); last {LOG_TAIL_LINES} lines of {log_file}:\n"
                    f"{log_tail(log_file)}",
                    metadata={"worker_log": MetadataValue.path(str(log_file))},
                ) from None
        return invocation, {"launcher": "local", "gpu": gpu_id}

    @staticmethod
    def _cpu_share(context: AssetExecutionContext) -> tuple[int, str]:
        """torch threads for a CPU worker: its share of the cores among the heavy steps that the step's pool
        lets run at once (heavy_step_slots.py); and that limit, in words for the step log."""
        pool = context.op_def.pool
        storage = context.instance.event_log_storage
        limit = storage.get_concurrency_info(pool).limit if pool and storage.supports_global_concurrency_limits else None
        if not limit:
            return cpu_threads_per_step(None), f"pool {pool!r} has no limit, counted as one heavy step at a time"
        return cpu_threads_per_step(limit), f"{limit} heavy steps may run at once (pool {pool!r})"

    def _run_on_ray(
        self, context: AssetExecutionContext, step: str, request: BaseModel, log_file: Path
    ) -> tuple[PipesClientCompletedInvocation, dict[str, Any]]:
        threads, why = self._cpu_share(context)
        ray_step = RayStep.plan(context, step, request, env=WORKER_ENV, cpu_threads=threads)
        cpus = f" and {ray_step.num_cpus} CPU(s) for as many torch threads ({why})" if ray_step.num_cpus else ""
        context.log.info(
            f"{step}: submitting Ray job {ray_step.job_id} to {request.settings.ray_address} "
            f"asking for {ray_step.num_gpus:g} GPU(s){cpus}; its log is kept in {log_file}"
        )
        try:
            invocation = self.pipes_client.run(
                context=context,
                submit_job_params=ray_step.submit_job_params(),
                extras={"request": ray_step.request.model_dump(mode="json")},
            )
        # RuntimeError for a FAILED or STOPPED job; any error after the job started stopped it (pipes_clients.py).
        except Exception as exc:
            status = ray_step.save_log(self.pipes_client.client, log_file)
            raise Failure(
                description=f"the {step} Ray job {ray_step.job_id} did not finish (status {status}: {exc}); "
                f"last {LOG_TAIL_LINES} lines of its log:\n{log_tail(log_file)}",
                metadata={"worker_log": MetadataValue.path(str(log_file)), "ray_job_id": ray_step.job_id},
            ) from None
        ray_step.save_log(self.pipes_client.client, log_file)
        return invocation, {
            "launcher": "ray", "ray_address": request.settings.ray_address, "ray_job_id": ray_step.job_id,
            "gpus": ray_step.num_gpus, "cpus": ray_step.num_cpus,
        }
