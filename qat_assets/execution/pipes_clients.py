"""The Pipes client heavy steps run through, chosen per deployment from settings (QAT_LAUNCHER).

Like Dagster's example deployments pick resources per environment, the code location picks this
once, when it loads: `local` runs the worker as a subprocess of the step, `ray` submits it as a Ray
job to the cluster whose dashboard is at QAT_RAY_ADDRESS (dagster-ray's Pipes client; the worker's
messages come back through the job's logs). Importing dagster_ray does not import ray.
"""

from __future__ import annotations

from dagster import PipesClient, PipesSubprocessClient
from dagster_ray import PipesRayJobClient

from qat_assets.core.settings import Settings


def pipes_client_for(settings: Settings) -> PipesClient:
    if settings.launcher == "ray":
        # forward_termination: a terminated Dagster step stops its Ray job, so no GPU is held by an orphan.
        return PipesRayJobClient(address=settings.ray_address, forward_termination=True, poll_interval=1.0)
    return PipesSubprocessClient()


def launcher_kind(client: PipesClient) -> str:
    """`local` or `ray`: which launcher setting a client serves."""
    if isinstance(client, PipesRayJobClient):
        return "ray"
    if isinstance(client, PipesSubprocessClient):
        return "local"
    raise TypeError(f"heavy steps run through PipesSubprocessClient or PipesRayJobClient, not {type(client).__name__}")
