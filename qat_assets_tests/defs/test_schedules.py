"""The seed backfill schedule against a real instance: partition status as Dagster reports it."""

from datetime import datetime, timezone

from dagster import AssetMaterialization, DagsterRunStatus, build_schedule_context

from qat_assets.defs.automation.jobs import PARTITIONED_STAGES
from qat_assets.definitions import defs
from qat_assets_tests.dagster_harness import key

schedule = defs.get_schedule_def("seed_backfill")
ALL = ["baseline|0", "baseline|1", "ema|0", "ema|1"]
CHAIN = ["qat_checkpoint", "qc_checkpoint", "onnx_model", "stability_verdict"]


def materialize(instance, partition, variants=("yolo10n", "yolo10s"), stages=PARTITIONED_STAGES):
    for variant in variants:
        for stage in stages:
            instance.report_runless_asset_event(AssetMaterialization(key(f"{variant}/{stage}"), partition=partition))


def requested(instance):
    """{(variant, partition): [asset paths]} of the schedule's run requests."""
    context = build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 11, 23, 2, tzinfo=timezone.utc),
        repository_def=defs.get_repository_def(),
    )
    requests = schedule.evaluate_tick(context).run_requests or []
    for request in requests:
        assert {k.path[0] for k in request.asset_selection} == {request.tags["qat/variant"]}  # one variant a run
    return {
        (r.tags["qat/variant"], r.partition_key): [k.path[1] for k in r.asset_selection] for r in requests
    }


def test_fresh_instance_requests_every_stage_of_every_partition_per_variant(instance):
    assert requested(instance) == {(v, p): CHAIN for v in ("yolo10n", "yolo10s") for p in ALL}


def test_only_missing_or_failed_assets_are_requested_and_none_of_a_partition_in_progress(storage, instance):
    for partition in ALL:
        materialize(instance, partition, variants=("yolo10n",) if partition == "baseline|1" else ("yolo10n", "yolo10s"))
    job = defs.resolve_job_def("validation_partition_job")
    # ema|0: a real run of the partition job that fails (no FP checkpoint) after the partition had materialized:
    # QAT fails first, so every stage of both variants is requested again.
    assert not job.execute_in_process(instance=instance, partition_key="ema|0", raise_on_error=False).success
    # ema|1: a run created but not started, its materializations planned. `create_run_for_job` is an instance method
    # outside Dagster's documented API; it is the only way to have a run in progress without timing.
    instance.create_run_for_job(job, tags={"dagster/partition": "ema|1"}, status=DagsterRunStatus.NOT_STARTED)
    instance.report_runless_asset_event(AssetMaterialization(key("yolo10s/qat_checkpoint"), partition="ema|1"))
    assert requested(instance) == {
        ("yolo10s", "baseline|1"): CHAIN,  # missing for yolo10s only: yolo10n's is not rerun
        ("yolo10n", "ema|0"): CHAIN,
        ("yolo10s", "ema|0"): CHAIN,
    }


def test_a_missing_qc_reruns_qc_and_what_follows_it_not_qat(storage, instance):
    for partition in ALL:
        materialize(instance, partition)
    job = defs.resolve_job_def("validation_partition_job")
    # A real run of yolo10s' QC alone that fails (no QAT checkpoint on disk) after the partition had materialized.
    result = job.execute_in_process(
        instance=instance, partition_key="ema|1", asset_selection=[key("yolo10s/qc_checkpoint")], raise_on_error=False,
    )
    assert not result.success
    assert requested(instance) == {("yolo10s", "ema|1"): ["qc_checkpoint", "onnx_model", "stability_verdict"]}


def test_nothing_to_do_is_a_skip(instance):
    for partition in ALL:
        materialize(instance, partition)
    assert requested(instance) == {}
