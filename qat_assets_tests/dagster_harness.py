"""Running the real code location's assets against a temporary Dagster instance."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import AssetKey, DagsterInstance, Definitions

from qat_assets.definitions import defs


def foundation_job():
    """The foundation job, as `reconstructable` needs it: a module-level function."""
    return defs.resolve_job_def("foundation_job")


def key(path: str) -> AssetKey:
    return AssetKey(path.split("/"))


def run_assets(
    instance: DagsterInstance, paths: Sequence[str], partition: str | None = None, resources: dict | None = None
):
    """Materialize `paths` (e.g. "yolo10n/qat_checkpoint") in-process; failures are returned, not raised.

    `resources` replaces the code location's resources of those names (e.g. a launcher on Ray), the way
    the code location would bind them when loaded with other settings.
    """
    definitions = defs
    if resources:
        definitions = Definitions(
            assets=defs.assets, asset_checks=defs.asset_checks, resources={**defs.resources, **resources}
        )
    job = definitions.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance, asset_selection=[key(p) for p in paths], partition_key=partition, raise_on_error=False
    )


def step_failure_messages(result) -> list[str]:
    return [
        event.step_failure_data.error.message + (event.step_failure_data.user_failure_data.description or "")
        if event.step_failure_data.user_failure_data else event.step_failure_data.error.message
        for event in result.all_events if event.is_step_failure
    ]


def latest_materialization(instance: DagsterInstance, path: str, partition: str | None = None):
    records = instance.fetch_materializations(key(path), limit=100).records
    return next(r.asset_materialization for r in records if partition is None or r.asset_materialization.partition == partition)


def latest_metadata(instance: DagsterInstance, path: str, partition: str | None = None) -> dict:
    return {k: v.value for k, v in latest_materialization(instance, path, partition).metadata.items()}


def data_version(instance: DagsterInstance, path: str, partition: str | None = None) -> str | None:
    """The data version Dagster recorded on the latest materialization (the `dagster/data_version` tag)."""
    return latest_materialization(instance, path, partition).tags.get("dagster/data_version")
