"""Evaluation of a detection model on the val split with Ultralytics' own validator.

Every evaluation in the project (pretrained reference, PTQ epoch 0, in-training validation, QC before
and after) uses the settings from `evaluation_settings`, so their numbers are comparable; the settings
are recorded next to every metric.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

METRIC_KEYS = {
    "map50_95": "metrics/mAP50-95(B)",
    "map50": "metrics/mAP50(B)",
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
}


def resolve_device(requested: str) -> str:
    """`QAT_DEVICE` as given, or the first visible GPU if any, else the CPU."""
    if requested:
        return requested
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def evaluation_settings(imgsz: int, batch: int) -> dict[str, Any]:
    """The validator settings shared by every evaluation (Ultralytics defaults for mAP computation).

    `batch` is the training batch. Ultralytics' in-training validator (epochs 1..N) builds rectangular
    batches of twice the training batch, padded per batch (a 128 px square image is evaluated at 160);
    the standalone validator (PTQ epoch 0, QC before/after, FP reference) is set up the same way so all
    numbers of a run are measured alike. `precision`: every evaluation runs fp32 weights and images with
    autocast off, also in a run trained under AMP (core/trainer.py `FP32TrainingValidator`); on Ampere and
    newer GPUs cuDNN's TF32 default applies to its convolutions, alike for every figure.
    """
    return {
        "split": "val", "imgsz": imgsz, "batch": 2 * batch, "rect": True, "conf": 0.001, "iou": 0.7, "max_det": 300,
        "precision": EVALUATION_PRECISION,
    }


EVALUATION_PRECISION = "fp32"


def validator_arguments(imgsz: int, batch: int) -> dict[str, Any]:
    """`evaluation_settings` as Ultralytics' validator arguments (fp32 is its default: `quantize` unset)."""
    settings = evaluation_settings(imgsz, batch)
    del settings["precision"]
    return settings


def metrics_from_ultralytics(results: dict[str, float]) -> dict[str, float]:
    """Our metric names from an Ultralytics results dict (keys like `metrics/mAP50-95(B)`)."""
    return {ours: float(results.get(theirs, 0.0)) for ours, theirs in METRIC_KEYS.items()}


def evaluate_model(
    model, data_yaml: Path, *, imgsz: int, batch: int, device: str, workers: int, work_dir: Path, nms: bool | None = None,
    per_image: list | None = None,
) -> dict[str, float]:
    """mAP50-95, mAP50, precision and recall of `model` (a float or frozen-quantized DetectionModel).

    `nms=False` evaluates a YOLOv10's one-to-one (NMS-free) head, as Ultralytics' `val(nms=False)` does.
    `per_image`, when given, receives each val image's matching statistics (see `core/image_bootstrap.py`).
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    os.environ.setdefault("YOLO_OFFLINE", "1")
    validator = DetectionValidator(
        args=dict(
            data=str(data_yaml), device=device, plots=False, save_json=False, verbose=False,
            project=str(work_dir), name="val", exist_ok=True, workers=workers, nms=nms,
            **validator_arguments(imgsz, batch),
        )
    )
    if per_image is not None:
        from qat_assets.core.image_bootstrap import record_per_image

        record_per_image(validator, per_image)
    # The validator fuses Conv+BN in place; evaluate a copy so the caller's model keeps its structure.
    results = validator(model=copy.deepcopy(model))
    return metrics_from_ultralytics(results)
