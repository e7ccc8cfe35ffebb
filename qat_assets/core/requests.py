"""What the Dagster side sends a worker for each heavy step (pydantic only: no torch on that side)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from .settings import Settings


class PretrainRequest(BaseModel):
    variant: str
    dataset_yaml: Path
    dataset_fingerprint: str
    names: list[str]
    train_images: int
    out_dir: Path
    settings: Settings


class QATRequest(BaseModel):
    variant: str
    method: Literal["baseline", "ema"]
    seed: int
    pretrained_checkpoint: Path
    pretrained_sha256: str
    dataset_yaml: Path
    dataset_fingerprint: str
    train_images: int
    out_dir: Path
    trajectory_dir: Path  # the seed's training, shared by both methods
    settings: Settings


class QCRequest(BaseModel):
    variant: str
    method: Literal["baseline", "ema"]
    seed: int
    qat_checkpoint: Path
    qat_sha256: str
    calibration_yaml: Path
    calibration_fingerprint: str
    dataset_yaml: Path
    out_dir: Path
    settings: Settings


class ExportRequest(BaseModel):
    variant: str
    method: Literal["baseline", "ema"]
    seed: int
    source: Literal["qc", "qat"]
    checkpoint: Path
    checkpoint_sha256: str
    pretrained_checkpoint: Path
    pretrained_sha256: str
    dataset_yaml: Path
    out_dir: Path
    settings: Settings
