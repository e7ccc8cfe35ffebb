"""Asset jobs: the stages of the validation ladder, and the gated yolo10m runs."""

from dagster import AssetSelection, define_asset_job

from qat_assets.core.settings import VALIDATION_VARIANTS

PARTITIONED_STAGES = ("qat_checkpoint", "qc_checkpoint", "stability_verdict", "onnx_model")


def stage_selection(variants: tuple[str, ...], stages: tuple[str, ...]) -> AssetSelection:
    return AssetSelection.assets(*[[variant, stage] for variant in variants for stage in stages])


def build_jobs() -> dict:
    return {
        "foundation_job": define_asset_job(
            "foundation_job",
            selection=AssetSelection.assets("coco_subset", "calibration_subset")
            | stage_selection(VALIDATION_VARIANTS, ("pretrained_checkpoint",)),
            description="Dataset, calibration set and the yolo10n/yolo10s FP starting points.",
        ),
        "validation_partition_job": define_asset_job(
            "validation_partition_job",
            selection=stage_selection(VALIDATION_VARIANTS, PARTITIONED_STAGES),
            description="QAT, QC, the verdict and the ONNX export of one method|seed partition, for yolo10n and yolo10s.",
        ),
        "decision_job": define_asset_job(
            "decision_job",
            selection=AssetSelection.assets("comparison", "gate"),
            description="Comparison, plots, summary.md and the gate.",
        ),
        "yolo10m_pretrained_job": define_asset_job(
            "yolo10m_pretrained_job", selection=stage_selection(("yolo10m",), ("pretrained_checkpoint",)),
        ),
        "yolo10m_partition_job": define_asset_job(
            "yolo10m_partition_job", selection=stage_selection(("yolo10m",), PARTITIONED_STAGES),
        ),
    }
