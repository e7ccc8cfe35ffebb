"""`coco_subset` and `calibration_subset`: light steps, run in the Dagster process (no torch)."""


from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from qat_assets.core import layout
from qat_assets.core.calibration import select_calibration_subset
from qat_assets.core.coco import SubsetResult, convert_coco_subset
from qat_assets.core.synthetic import write_synthetic_coco
from qat_assets.defs.metadata import clear_failures
from qat_assets.defs.resources import ExperimentSettings


@asset(group_name="dataset", kinds={"python"})
def coco_subset(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
    """Deterministic YOLO-format subset of COCO2017 (QAT_COCO_ROOT), or of the embedded synthetic set."""
    with clear_failures():
        return _materialize_coco_subset(context, experiment.settings())


def _materialize_coco_subset(context: AssetExecutionContext, settings) -> MaterializeResult:
    root = settings.artifact_root()
    if settings.coco_root is not None:
        coco_root, source = settings.coco_root, None
        context.log.info(f"converting COCO2017 at {coco_root}")
    else:
        coco_root, source = layout.synthetic_coco_dir(root), "synthetic"
        summary = write_synthetic_coco(
            coco_root, train_images=settings.synthetic_train_images, val_images=settings.synthetic_val_images,
            image_size=settings.synthetic_image_size, seed=settings.subset_seed, difficulty=settings.synthetic_difficulty,
        )
        context.log.info(f"QAT_COCO_ROOT unset: wrote the embedded synthetic COCO tree {coco_root} ({summary})")
    subset = convert_coco_subset(
        coco_root, layout.subset_dir(root), train_images=settings.train_images, val_images=settings.val_images,
        seed=settings.subset_seed, skip_bad_items=settings.skip_bad_items, source=source, log=context.log.info,
    )
    # The fingerprint is a sha256 over the selected images, their labels and the conversion settings.
    return MaterializeResult(
        metadata=subset_metadata(subset, settings.as_metadata()), data_version=DataVersion(subset.fingerprint)
    )


def subset_metadata(subset: SubsetResult, settings: dict[str, str]) -> dict:
    return {
        "source": subset.source,
        "train_images": subset.counts["train"]["images"],
        "val_images": subset.counts["val"]["images"],
        "counts": MetadataValue.json(subset.counts),
        "class_names": MetadataValue.json(subset.class_names),
        "instances_per_class": MetadataValue.json(subset.instances_per_class),
        "skipped": MetadataValue.json(subset.skipped),
        "fingerprint": subset.fingerprint,
        "dataset_yaml": MetadataValue.path(str(subset.dataset_yaml)),
        "preview": MetadataValue.md(subset.preview_markdown()),
        "settings": MetadataValue.json(settings),
    }


@asset(group_name="dataset", deps=[coco_subset], kinds={"python"})
def calibration_subset(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
    """The QC calibration set D_c: a seeded sample of the subset's training split."""
    settings = experiment.settings()
    root = settings.artifact_root()
    with clear_failures():
        subset = SubsetResult.read(layout.subset_dir(root))
        calibration = select_calibration_subset(
            subset, layout.calibration_dir(root), size=settings.calibration_images, seed=settings.subset_seed
        )
    context.log.info(f"calibration set: {calibration.images} training images")
    return MaterializeResult(
        metadata={
            "images": calibration.images,
            "fingerprint": calibration.fingerprint,
            "subset_fingerprint": subset.fingerprint,
            "dataset_yaml": MetadataValue.path(str(calibration.dataset_yaml)),
        },
        data_version=DataVersion(calibration.fingerprint),
    )
