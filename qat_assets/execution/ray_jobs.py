"""One heavy step as a Ray job: its id, the resources and code it takes along, and its log once it has ended.

The job runs the same worker command as the local path. Ray reserves `entrypoint_num_gpus` for the
job's lifetime and sets CUDA_VISIBLE_DEVICES to the GPU it placed it on, so the worker uses cuda:0. A
CPU-only job reserves as many CPUs as it runs torch threads, so Ray spreads such jobs over the nodes
instead of piling them onto one. The job carries this process's `qat_assets` (runtime_env `py_modules`:
Ray uploads the package once per content and puts it first on the worker's path), so the code that runs
is the code whose version the asset records, whatever `qat_assets` the node's Python has installed; the
node still needs the dependencies (torch, Ultralytics, Brevitas).
The worker keeps writing to stdout/stderr (Ray keeps that as the job's log, and dagster-ray reads the
Pipes messages from it); when the job ends, that log is copied next to the step's outputs, where the
local path keeps its worker log too.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import AssetExecutionContext
from dagster_pipes import PIPES_PROTOCOL_VERSION_FIELD
from pydantic import BaseModel

import qat_assets
from qat_assets.core.artifacts import write_text_atomic
from qat_assets.core.settings import Settings
from qat_assets.execution.worker import WORKER_THREADS_ENV

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# The interpreter on the Ray nodes: the one on their PATH, with qat_assets installed (README, "Running on a cluster").
NODE_PYTHON = "python"
QAT_ASSETS_DIR = Path(qat_assets.__file__).parent


@dataclass(frozen=True)
class RayStep:
    job_id: str
    step: str
    request: BaseModel
    num_gpus: float
    env: dict[str, str]
    num_cpus: int = 0  # a CPU-only job's torch threads; 0 for a GPU job, whose CPU use Ray does not bound

    @classmethod
    def plan(
        cls, context: AssetExecutionContext, step: str, request: BaseModel, env: dict[str, str], cpu_threads: int
    ) -> "RayStep":
        """`cpu_threads`: the torch threads the step runs on when it gets no GPU."""
        settings: Settings = request.settings
        num_gpus = settings.ray_gpus()
        # The job does not inherit this process's DAGSTER_HOME: pin the artifact root it resolves to.
        pinned: dict[str, Any] = {"storage": settings.artifact_root()}
        if num_gpus >= 1 and settings.device.startswith("cuda"):
            pinned["device"] = "cuda:0"  # Ray shows the job only the GPU it placed it on
        request = request.model_copy(update={"settings": settings.model_copy(update=pinned)})
        partition = f"-{context.partition_key}" if context.has_partition_key else ""
        name = f"qat-{context.asset_key.to_user_string()}{partition}-{context.run.run_id[:8]}-{secrets.token_hex(3)}"
        cpu_only = num_gpus == 0 and not settings.device.startswith("cuda")
        env = {**env, WORKER_THREADS_ENV: str(cpu_threads)} if cpu_only else dict(env)
        return cls(re.sub(r"[^A-Za-z0-9_.-]+", "-", name), step, request, num_gpus, env, cpu_threads if cpu_only else 0)

    def submit_job_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "entrypoint": shlex.join([NODE_PYTHON, "-m", "qat_assets.execution.worker", self.step]),
            "submission_id": self.job_id,
            "runtime_env": {
                # `python -m` would put the job's working directory first on sys.path, ahead of the carried
                # package (a checkout there would win); PYTHONSAFEPATH (Python >= 3.11) leaves it out.
                "env_vars": {**self.env, "PYTHONSAFEPATH": "1"},
                "py_modules": [str(QAT_ASSETS_DIR)],
                "excludes": ["__pycache__", "*.pyc"],
            },
            "metadata": {"qat_step": self.step},
        }
        if self.num_gpus:
            params["entrypoint_num_gpus"] = self.num_gpus
        if self.num_cpus:
            params["entrypoint_num_cpus"] = self.num_cpus
        return params

    def save_log(self, client: "JobSubmissionClient", log_file: Path) -> str:
        """Copy the job's log (without the Pipes protocol lines) to `log_file`; return the job's status."""
        try:
            status = str(client.get_job_status(self.job_id))
            text = client.get_job_logs(self.job_id)
        except Exception as exc:  # the cluster went away: say so in place of the log
            status, text = "UNKNOWN", f"(could not fetch the log of Ray job {self.job_id}: {exc})\n"
        lines = [line for line in text.splitlines() if not is_pipes_message(line)]
        write_text_atomic(log_file, "\n".join(lines) + "\n")
        return status


def is_pipes_message(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return PIPES_PROTOCOL_VERSION_FIELD in json.loads(line)
    except ValueError:
        return False
