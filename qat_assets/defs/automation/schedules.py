"""Nightly seed backfill: per variant and method|seed partition, the yolo10n/yolo10s assets that are missing
or failed, and the stages after them; none of a partition whose run is in progress.

The status of each partition comes from Dagster (`get_status_by_partition`: materialized, failed or
in progress, per asset). Each request selects only what that variant's partition needs
(`asset_selection`), so one missing yolo10s partition does not rerun yolo10n's QAT, QC or export.
"""

from dagster import AssetKey, AssetPartitionStatus, RunRequest, ScheduleEvaluationContext, SkipReason, schedule

from qat_assets.core.settings import VALIDATION_VARIANTS
from qat_assets.defs.variant.partitions import run_partitions

# A partition's stages, each after every stage it depends on (qc on qat, the ONNX export on qc, the verdict on
# qat and qc). What follows a missing stage is rerun with it: it was made from the stage's older output, or
# never. Only the verdict, seconds of work, can be rerun without need (after a missing ONNX export).
CHAIN = ("qat_checkpoint", "qc_checkpoint", "onnx_model", "stability_verdict")


def assets_to_backfill(instance, seeds: tuple[int, ...]) -> dict[tuple[str, str], list[AssetKey]]:
    """Per (variant, partition key): the assets to materialize; a partition with an asset in progress is left out."""
    partitions_def = run_partitions(seeds)
    keys = partitions_def.get_partition_keys()
    wanted = {}
    for variant in VALIDATION_VARIANTS:
        chain = [AssetKey([variant, stage]) for stage in CHAIN]
        statuses = [instance.get_status_by_partition(asset, keys, partitions_def) or {} for asset in chain]
        for key in keys:
            of_key = [status.get(key) for status in statuses]
            if AssetPartitionStatus.IN_PROGRESS in of_key:
                continue
            missing = [i for i, s in enumerate(of_key) if s in (None, AssetPartitionStatus.FAILED)]
            if missing:
                wanted[(variant, key)] = chain[missing[0]:]
    return dict(sorted(wanted.items()))


def build_seed_backfill_schedule(seeds: tuple[int, ...], partition_job, cron: str):
    @schedule(
        name="seed_backfill", cron_schedule=cron, job=partition_job,
        description="Requests, per variant and method|seed partition, the yolo10n/yolo10s assets that are missing "
        "or failed and the stages after them (none of a partition in progress).",
    )
    def seed_backfill(context: ScheduleEvaluationContext):
        wanted = assets_to_backfill(context.instance, seeds)
        if not wanted:
            return SkipReason("every yolo10n/yolo10s partition is materialized or in progress, none failed")
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        return [
            RunRequest(
                run_key=f"backfill-{stamp}-{variant}-{key}", partition_key=key, asset_selection=assets,
                tags={"qat/variant": variant},
            )
            for (variant, key), assets in wanted.items()
        ]

    return seed_backfill
