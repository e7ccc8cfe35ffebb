"""The yolo10m sensor: requests the expensive runs only behind a passing gate, once per gate result."""

from dagster import AssetKey, RunRequest, SensorEvaluationContext, SkipReason, sensor

from qat_assets.core.settings import METHODS
from qat_assets.defs.decision.gating import latest_gate, latest_materialization_record
from qat_assets.defs.variant.partitions import partition_key

YOLO10M_PRETRAINED = AssetKey(["yolo10m", "pretrained_checkpoint"])


def build_yolo10m_sensor(seeds: tuple[int, ...], pretrained_job, partition_job):
    @sensor(
        name="yolo10m_after_gate", jobs=[pretrained_job, partition_job], minimum_interval_seconds=60,
        description="When the latest gate passed: yolo10m's FP checkpoint, then every method|seed partition.",
    )
    def yolo10m_after_gate(context: SensorEvaluationContext):
        gate = latest_gate(context.instance)
        if not gate.passed:
            return SkipReason("gate not passing: " + "; ".join(gate.reasons))
        # Run keys carry the gate materialization's id: each passing gate result launches its runs once.
        pretrained = latest_materialization_record(context.instance, YOLO10M_PRETRAINED)
        if pretrained is None or pretrained.storage_id < gate.storage_id:
            return [RunRequest(run_key=f"gate-{gate.storage_id}-pretrained", job_name=pretrained_job.name)]
        return [
            RunRequest(
                run_key=f"gate-{gate.storage_id}-{partition_key(method, seed)}",
                job_name=partition_job.name,
                partition_key=partition_key(method, seed),
            )
            for method in METHODS for seed in seeds
        ]

    return yolo10m_after_gate
