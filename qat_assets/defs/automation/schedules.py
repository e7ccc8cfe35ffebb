"""Nightly seed backfill: every yolo10n/yolo10s partition that is missing or whose latest run failed."""

from dagster import AssetKey, DagsterRunStatus, RunRequest, RunsFilter, ScheduleEvaluationContext, SkipReason, schedule

from qat_assets.core.settings import METHODS, VALIDATION_VARIANTS
from qat_assets.defs.variant.partitions import partition_key

IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
PARTITION_TAG = "dagster/partition"


def partitions_to_backfill(instance, job_name: str, seeds: tuple[int, ...]) -> list[str]:
    """Keys missing a verdict for either variant, or whose latest run failed; none already in flight."""
    verdicts = {
        v: instance.get_materialized_partitions(AssetKey([v, "stability_verdict"])) for v in VALIDATION_VARIANTS
    }
    wanted = []
    for method in METHODS:
        for seed in seeds:
            key = partition_key(method, seed)
            runs = instance.get_runs(RunsFilter(job_name=job_name, tags={PARTITION_TAG: key}), limit=1)
            latest = runs[0] if runs else None
            if latest is not None and latest.status in IN_FLIGHT:
                continue
            missing = any(key not in done for done in verdicts.values())
            failed = latest is not None and latest.status == DagsterRunStatus.FAILURE
            if missing or failed:
                wanted.append(key)
    return wanted


def build_seed_backfill_schedule(seeds: tuple[int, ...], partition_job, cron: str):
    @schedule(
        name="seed_backfill", cron_schedule=cron, job=partition_job,
        description="Requests every yolo10n/yolo10s method|seed partition that is missing or whose latest run failed.",
    )
    def seed_backfill(context: ScheduleEvaluationContext):
        keys = partitions_to_backfill(context.instance, partition_job.name, seeds)
        if not keys:
            return SkipReason("every yolo10n/yolo10s partition has a verdict and no failed latest run")
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        return [RunRequest(run_key=f"backfill-{stamp}-{key}", partition_key=key) for key in keys]

    return seed_backfill
