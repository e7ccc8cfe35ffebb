from datetime import datetime, timezone

from dagster import AssetMaterialization, DagsterRunStatus, build_schedule_context
from dagster._core.test_utils import create_run_for_test

from qat_assets.definitions import defs
from qat_assets_tests.dagster_harness import key

schedule = defs.get_schedule_def("seed_backfill")
JOB = "validation_partition_job"


def verdict(instance, variant, partition):
    instance.report_runless_asset_event(AssetMaterialization(key(f"{variant}/stability_verdict"), partition=partition))


def requested(instance):
    context = build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 11, 23, 2, tzinfo=timezone.utc),
        repository_def=defs.get_repository_def(),
    )
    return sorted(r.partition_key for r in schedule.evaluate_tick(context).run_requests or [])


def test_fresh_instance_requests_every_partition(instance):
    assert requested(instance) == ["baseline|0", "baseline|1", "ema|0", "ema|1"]


def test_only_missing_or_failed_partitions_are_requested(instance):
    for variant in ("yolo10n", "yolo10s"):
        verdict(instance, variant, "baseline|0")
        verdict(instance, variant, "ema|0")
    verdict(instance, "yolo10n", "baseline|1")  # yolo10s baseline|1 still missing
    create_run_for_test(instance, job_name=JOB, tags={"dagster/partition": "baseline|0"}, status=DagsterRunStatus.SUCCESS)
    create_run_for_test(instance, job_name=JOB, tags={"dagster/partition": "ema|0"}, status=DagsterRunStatus.FAILURE)
    create_run_for_test(instance, job_name=JOB, tags={"dagster/partition": "ema|1"}, status=DagsterRunStatus.STARTED)
    # ema|0: materialized but its latest run failed; baseline|1: missing for yolo10s; ema|1 is in flight.
    assert requested(instance) == ["baseline|1", "ema|0"]


def test_nothing_to_do_is_a_skip(instance):
    for variant in ("yolo10n", "yolo10s"):
        for partition in ("baseline|0", "baseline|1", "ema|0", "ema|1"):
            verdict(instance, variant, partition)
    assert requested(instance) == []
