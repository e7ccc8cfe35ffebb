"""The Pipes client heavy steps run through, chosen per deployment from settings (QAT_LAUNCHER).

Like Dagster's example deployments pick resources per environment, the code location picks this
once, when it loads: `local` runs the worker as a subprocess of the step, `ray` submits it as a Ray
job to the cluster whose dashboard is at QAT_RAY_ADDRESS (dagster-ray's Pipes client; the worker's
messages come back through the job's logs). Importing dagster_ray does not import ray.
"""

from __future__ import annotations

from typing import Any

from dagster import PipesClient, PipesClientCompletedInvocation, PipesSubprocessClient
from dagster_ray import PipesRayJobClient, PipesRayJobMessageReader

from qat_assets.core.settings import Settings
from qat_assets.execution.pipes_messages import CompleteLineMessageReader


class RayJobPipesClient(PipesRayJobClient):
    """dagster-ray's client with a fresh message reader for every run.

    dagster-ray 0.4.8 builds one PipesRayJobMessageReader per client; once a run has closed its session,
    the reader's `session_closed` flag stays set, so a second step in the same process (the in-process
    executor, a test) would read none of its job's messages. The reader is swapped before each run.
    """

    def run(self, *, context: Any, submit_job_params: Any, extras: Any = None) -> PipesClientCompletedInvocation:
        self._message_reader = PipesRayJobMessageReader()
        return super().run(context=context, submit_job_params=submit_job_params, extras=extras)


def pipes_client_for(settings: Settings) -> PipesClient:
    if settings.launcher == "ray":
        # forward_termination: a terminated Dagster step stops its Ray job, so no GPU is held by an orphan.
        return RayJobPipesClient(address=settings.ray_address, forward_termination=True, poll_interval=1.0)
    # Dagster's own file reader can parse half a message (pipes_messages.py).
    return PipesSubprocessClient(message_reader=CompleteLineMessageReader())


def launcher_kind(client: PipesClient) -> str:
    """`local` or `ray`: which launcher setting a client serves."""
    if isinstance(client, PipesRayJobClient):
        return "ray"
    if isinstance(client, PipesSubprocessClient):
        return "local"
    raise TypeError(f"heavy steps run through PipesSubprocessClient or PipesRayJobClient, not {type(client).__name__}")
