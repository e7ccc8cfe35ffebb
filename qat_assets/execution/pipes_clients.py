"""The Pipes client heavy steps run through, chosen per deployment from settings (QAT_LAUNCHER).

Like Dagster's example deployments pick resources per environment, the code location picks this
once, when it loads: `local` runs the worker as a subprocess of the step, `ray` submits it as a Ray
job to the cluster whose dashboard is at QAT_RAY_ADDRESS (dagster-ray's Pipes client; the worker's
messages come back through the job's logs). Importing dagster_ray does not import ray.
"""

from __future__ import annotations

import re
import time
from typing import Any

from dagster import (
    PipesClient,
    PipesClientCompletedInvocation,
    PipesEnvContextInjector,
    PipesSubprocessClient,
    open_pipes_session,
)
from dagster_ray import PipesRayJobClient
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from qat_assets.core.settings import Settings
from qat_assets.execution.pipes_messages import CompleteLineMessageReader
from qat_assets.execution.ray_job_messages import CompleteLineRayJobMessageReader

# How long the dashboard may be unreachable before a step gives up on its job (a head restart takes tens of
# seconds), and how long a step that gives up keeps trying to stop the job and to see it ended.
STATUS_PATIENCE_S = 120.0
STOP_PATIENCE_S = 120.0


class RayJobPipesClient(PipesRayJobClient):
    """dagster-ray's client, with a job that cannot outlive its step.

    dagster-ray 0.4.8 stops the job only when the step is interrupted: when a status poll fails (the
    dashboard restarts) the step fails and the job trains on, holding its GPU, beside the retry that
    Dagster starts once the pool slot is free. Here status polls are retried with backoff for
    `status_patience_s`, and on any error while the job may be live, the job is stopped (retried for
    `stop_patience_s`, logged) before the error fails the step. Each run gets its own message reader
    (ray_job_messages.py: whole lines only, completed from the full log); dagster-ray's one reader per
    client stays closed after its first run.
    """

    def __init__(self, address: str, poll_interval: float = 1.0, status_patience_s: float = STATUS_PATIENCE_S,
                 stop_patience_s: float = STOP_PATIENCE_S):
        super().__init__(address=address, forward_termination=True, poll_interval=poll_interval)
        self.address = address
        self.status_patience_s = status_patience_s
        self.stop_patience_s = stop_patience_s

    def run(self, *, context: Any, submit_job_params: Any, extras: Any = None) -> PipesClientCompletedInvocation:
        """Submit the job (`submit_job_params` must name its `submission_id`), wait until it ends; raises
        RuntimeError when it FAILED or was STOPPED."""
        from ray.job_submission import JobStatus

        job_id = submit_job_params["submission_id"]
        reader = CompleteLineRayJobMessageReader(context.log)
        with open_pipes_session(
            context=context, message_reader=reader, context_injector=PipesEnvContextInjector(), extras=extras
        ) as session:
            runtime_env = dict(submit_job_params.get("runtime_env", {}))
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **session.get_bootstrap_env_vars()}
            try:
                self.client.submit_job(**{**submit_job_params, "runtime_env": runtime_env})
                session.report_launched({"extras": {"ray_job_id": job_id, "ray_address": self.client.get_address()}})
                status = self.wait_until_ended(context, job_id)
            except BaseException as exc:  # an interrupt too: the job may be live, so it is stopped first
                self.stop(context, job_id, exc)
                raise
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                raise RuntimeError(f"Ray job {job_id} ended {status}: {self.client.get_job_info(job_id).message}")
            return PipesClientCompletedInvocation(session, metadata={"Ray Job ID": job_id})

    def retrying(self, context: Any, what: str, patience_s: float) -> Retrying:
        return Retrying(
            stop=stop_after_delay(patience_s),
            wait=wait_exponential(multiplier=self.poll_interval, max=30.0),
            retry=retry_if_exception(may_pass),
            before_sleep=lambda state: context.log.warning(
                f"{what} failed ({state.outcome.exception()}); retrying in {state.next_action.sleep:.1f}s"
            ),
            reraise=True,
        )

    def wait_until_ended(self, context: Any, job_id: str) -> Any:
        poll = self.retrying(context, f"reading the status of Ray job {job_id}", self.status_patience_s)
        while not (status := poll(lambda: self.client.get_job_status(job_id))).is_terminal():
            time.sleep(self.poll_interval)
        return status

    def stop(self, context: Any, job_id: str, cause: BaseException) -> None:
        """Best effort: stop the job and wait until Ray says it ended; log what happened."""
        context.log.warning(f"stopping Ray job {job_id} before the step fails ({type(cause).__name__}: {cause})")
        stopping = self.retrying(context, f"stopping Ray job {job_id}", self.stop_patience_s)
        deadline = time.monotonic() + self.stop_patience_s
        try:
            stopping(lambda: self.client.stop_job(job_id))
            while not (status := stopping(lambda: self.client.get_job_status(job_id))).is_terminal():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"still {status} {self.stop_patience_s:.0f}s after it was asked to stop")
                time.sleep(self.poll_interval)
        except Exception as exc:
            context.log.error(
                f"could not stop Ray job {job_id} ({type(exc).__name__}: {exc}); it may still hold its GPU: "
                f"`ray job stop --address {self.address} {job_id}`"
            )
            return
        context.log.warning(f"Ray job {job_id} ended {status}")


def may_pass(error: BaseException) -> bool:
    """Whether a dashboard call is worth retrying: not after an interrupt, nor after an answer that the request
    itself was wrong (a 4xx status: no such job); yes after a connection error or a server error (restarting)."""
    return isinstance(error, Exception) and not re.search(r"status code 4\d\d", str(error))


def pipes_client_for(settings: Settings) -> PipesClient:
    if settings.launcher == "ray":
        return RayJobPipesClient(address=settings.ray_address)
    # Dagster's own file reader can parse half a message (pipes_messages.py).
    return PipesSubprocessClient(message_reader=CompleteLineMessageReader())


def launcher_kind(client: PipesClient) -> str:
    """`local` or `ray`: which launcher setting a client serves."""
    if isinstance(client, PipesRayJobClient):
        return "ray"
    if isinstance(client, PipesSubprocessClient):
        return "local"
    raise TypeError(f"heavy steps run through PipesSubprocessClient or PipesRayJobClient, not {type(client).__name__}")
