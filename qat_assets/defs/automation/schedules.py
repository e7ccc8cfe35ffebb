"""Nightly seed backfill: every yolo10n/yolo10s partition that is missing or failed, none in progress.

The status of each partition comes from Dagster (`get_status_by_partition`: materialized, failed or
in progress, per asset), over every asset the partition job materializes.
"""

from dagster import AssetKey, AssetPartitionStatus, RunRequest, ScheduleEvaluationContext, SkipReason, schedule

from qat_assets.core.settings import VALIDATION_VARIANTS
from qat_assets.defs.automation.jobs import PARTITIONED_STAGES
from qat_assets.defs.variant.partitions import run_partitions

PARTITIONED_KEYS = [AssetKey([variant, stage]) for variant in VALIDATION_VARIANTS for stage in PARTITIONED_STAGES]


def partitions_to_backfill(instance, seeds: tuple[int, ...]) -> list[str]:
    """Keys where some asset of the partition job is missing or failed, and none is in progress."""
    partitions_def = run_partitions(seeds)
    keys = partitions_def.get_partition_keys()
    statuses = [instance.get_status_by_partition(asset, keys, partitions_def) or {} for asset in PARTITIONED_KEYS]
    wanted = []
    for key in keys:
        of_key = [status.get(key) for status in statuses]
        if AssetPartitionStatus.IN_PROGRESS in of_key:
            continue
        if any(s in (None, AssetPartitionStatus.FAILED) for s in of_key):
            wanted.append(key)
    return sorted(wanted)


def build_seed_backfill_schedule(seeds: tuple[int, ...], partition_job, cron: str):
    @schedule(
        name="seed_backfill", cron_schedule=cron, job=partition_job,
        description="Requests every yolo10n/yolo10s method|seed partition that is missing or failed (none in progress).",
    )
    def seed_backfill(context: ScheduleEvaluationContext):
        keys = partitions_to_backfill(context.instance, seeds)
        if not keys:
            return SkipReason("every yolo10n/yolo10s partition is materialized or in progress, none failed")
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        return [RunRequest(run_key=f"backfill-{stamp}-{key}", partition_key=key) for key in keys]

    return seed_backfill
