"""The seed backfill schedule against a real instance: partition status as Dagster reports it."""

from datetime import datetime, timezone

from dagster import AssetMaterialization, DagsterRunStatus, build_schedule_context

from qat_assets.defs.automation.jobs import PARTITIONED_STAGES
from qat_assets.definitions import defs
from qat_assets_tests.dagster_harness import key

schedule = defs.get_schedule_def("seed_backfill")
ALL = ["baseline|0", "baseline|1", "ema|0", "ema|1"]


def materialize(instance, partition, variants=("yolo10n", "yolo10s")):
    for variant in variants:
        for stage in PARTITIONED_STAGES:
            instance.report_runless_asset_event(AssetMaterialization(key(f"{variant}/{stage}"), partition=partition))


def requested(instance):
    context = build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 11, 23, 2, tzinfo=timezone.utc),
        repository_def=defs.get_repository_def(),
    )
    return sorted(r.partition_key for r in schedule.evaluate_tick(context).run_requests or [])


def test_fresh_instance_requests_every_partition(instance):
    assert requested(instance) == ALL


def test_only_missing_or_failed_partitions_are_requested_and_none_in_progress(storage, instance):
    for partition in ALL:
        materialize(instance, partition, variants=("yolo10n",) if partition == "baseline|1" else ("yolo10n", "yolo10s"))
    job = defs.resolve_job_def("validation_partition_job")
    # ema|0: a real run of the partition job that fails (no FP checkpoint), after the partition had materialized.
    assert not job.execute_in_process(instance=instance, partition_key="ema|0", raise_on_error=False).success
    # ema|1: a run created but not started, its materializations planned. `create_run_for_job` is an instance method
    # outside Dagster's documented API; it is the only way to have a run in progress without timing.
    instance.create_run_for_job(job, tags={"dagster/partition": "ema|1"}, status=DagsterRunStatus.NOT_STARTED)
    instance.report_runless_asset_event(AssetMaterialization(key("yolo10s/qat_checkpoint"), partition="ema|1"))
    # baseline|1 is missing for yolo10s; ema|0 failed; ema|1 is in progress; baseline|0 is done.
    assert requested(instance) == ["baseline|1", "ema|0"]


def test_nothing_to_do_is_a_skip(instance):
    for partition in ALL:
        materialize(instance, partition)
    assert requested(instance) == []
