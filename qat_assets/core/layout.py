"""Where each artifact lives under the storage root; the one place both Dagster and the worker ask."""

from __future__ import annotations

from pathlib import Path


def subset_dir(root: Path) -> Path:
    return root / "coco_subset" / "subset"


def synthetic_coco_dir(root: Path) -> Path:
    return root / "coco_subset" / "synthetic_coco"


def calibration_dir(root: Path) -> Path:
    return root / "calibration_subset"


def pretrained_dir(root: Path, variant: str) -> Path:
    return root / variant / "pretrained_checkpoint"


def run_dir(root: Path, variant: str, stage: str, method: str, seed: int) -> Path:
    """`stage` is qat_checkpoint, qc_checkpoint or stability_verdict."""
    return root / variant / stage / f"{method}-{seed}"


def qat_trajectory_dir(root: Path, variant: str, seed: int) -> Path:
    """The QAT training of one seed, shared by the baseline and ema partitions (core/qat.py says why)."""
    return root / variant / "qat_trajectory" / f"seed-{seed}"


def comparison_dir(root: Path) -> Path:
    return root / "comparison"


def gate_file(root: Path) -> Path:
    return root / "gate" / "gate.json"
