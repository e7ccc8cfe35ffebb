"""Sidecars as the QAT, QC and pretraining workers write them, for tests of the decision layer.

Training a model to a real, non-degenerate mAP takes minutes, so tests of verdicts, comparison, gate and
sensor feed the real Dagster assets with the JSON sidecars those stages leave behind, written here with
chosen histories (healthy, collapsed, diverged). The training stages themselves are tested separately.
"""

from __future__ import annotations

from pathlib import Path

from qat_assets.core import layout
from qat_assets.core.artifacts import write_json_atomic
from qat_assets.core.evaluate import evaluation_settings
from qat_assets.core.settings import load_settings


def write_pretrained(root: Path, variant: str, dataset_fingerprint: str, map50_95: float = 0.4) -> None:
    write_json_atomic(layout.pretrained_dir(root, variant) / "pretrained.json", {
        "variant": variant, "names": ["rectangle", "ellipse", "triangle"], "sha256": "0" * 64,
        "metrics": {"map50_95": map50_95, "map50": map50_95 + 0.2, "precision": 0.6, "recall": 0.5},
        "dataset_fingerprint": dataset_fingerprint, "evaluation": evaluation_settings(64, 8),
    })


def write_qat_and_qc(
    root: Path, variant: str, method: str, seed: int, maps: list[float], *, dataset_fingerprint: str,
    qc_after: float | None = None, diverged_at: int | None = None, bn_after: float | None = None,
) -> None:
    """`maps[0]` is the PTQ epoch 0; `qc_after` None leaves QC unmaterialized; `bn_after` None: BN changes nothing."""
    settings = load_settings()
    history = [
        {"epoch": e, "map50_95": m, "map50": m + 0.2, "precision": 0.5, "recall": 0.5} for e, m in enumerate(maps)
    ]
    write_json_atomic(layout.run_dir(root, variant, "qat_checkpoint", method, seed) / "qat_checkpoint.json", {
        "variant": variant, "method": method, "seed": seed, "names": ["rectangle", "ellipse", "triangle"],
        "planned_epochs": settings.qat_epochs, "completed_epochs": len(maps) - 1, "diverged_at_epoch": diverged_at,
        "resume": "fresh start", "history": history, "ptq_map50_95": maps[0], "fp_map50_95": 0.4,
        "quantization": {"options": {"weight_bit_width": 4}, "layers": []}, "quantization_counts": {"w4": 94},
        "ema": {"decay": 0.9 if method == "ema" else 0.0}, "evaluation": evaluation_settings(64, 8),
        "dataset_fingerprint": dataset_fingerprint, "pretrained_sha256": "0" * 64,
        "profile_fingerprint": settings.training_profile_fingerprint(),
        "settings": settings.model_dump(mode="json"), "device": "cpu", "seconds": 1.0, "sha256": "0" * 64,
    })
    if qc_after is not None:
        before = maps[-1]
        write_json_atomic(layout.run_dir(root, variant, "qc_checkpoint", method, seed) / "qc_checkpoint.json", {
            "map50_95_before": before, "map50_95_after": qc_after, "map50_before": before + 0.2,
            "map50_after": qc_after + 0.2, "delta": qc_after - before, "max_fold_rel_diff": 1e-6, "seconds": 1.0,
            "qat_sha256": "0" * 64,
            "qc_settings": {"epochs": settings.qc_epochs, "lr": settings.qc_lr, "batch": settings.qc_batch,
                            "calibration_images": settings.calibration_images, "steps": 32,
                            "loss_before": 2.0, "loss_after": 1.9},
            "layer_stats": [{"name": "model.0.conv", "channels": 16, "mean_abs_gamma_minus_1": 0.01,
                             "max_abs_gamma_minus_1": 0.05, "mean_abs_beta": 0.02, "max_abs_beta": 0.07}],
            "bn_reestimation": {
                "map50_95_before": before, "map50_95_after": before if bn_after is None else bn_after,
                "map50_before": before + 0.2, "map50_after": (before if bn_after is None else bn_after) + 0.2,
                "delta": 0.0 if bn_after is None else bn_after - before, "batches": 8, "images": 256, "seconds": 1.0,
            },
        })
