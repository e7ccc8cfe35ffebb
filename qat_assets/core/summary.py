"""`run_summary.json`: the versioned record every QAT (+QC) run leaves behind.

One file per `variant × method × seed` holds everything needed to judge the run later without
re-running it: what was quantized and how, which data and settings it saw, the per-epoch history, the QC
outcome and both stability verdicts. Comparison, gate and report read only these files.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from qat_assets.core.artifacts import ArtifactError, write_json_atomic

SCHEMA_VERSION = 1
Status = Literal["completed-success", "completed-failed", "incomplete"]
Method = Literal["baseline", "ema"]


class LayerDiagnostics(BaseModel):
    """One quantized conv at the end of an epoch (core/diagnostics.py defines each quantity)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    bit_width: int
    weights: int
    out_channels: int
    zero_code_fraction: float
    dead_channels: int  # output channels whose codes are all 0
    max_over_rms: float  # max|w| / RMS(w) of the latent weights
    scale: float  # mean step size
    weight_rms: float | None = None  # RMS(w) of the latent weights; None: recorded before it was measured
    channel_norm_spread: float | None = None  # 90th / 10th percentile of the output channels' RMS
    oscillating_fraction: float | None = None  # None: not tracked (above the tracker's bit width)
    oscillation_frequency: float | None = None


class BNDiagnostics(BaseModel):
    """One BatchNorm: mean over channels of |log(running_var / batch_var)| on the fixed training batch."""

    model_config = ConfigDict(extra="forbid")

    name: str
    log_var_mismatch: float


class EpochDiagnostics(BaseModel):
    """Why a run collapses, per epoch: a whole-model summary (`model`, see `diagnostics.model_summary`), per layer."""

    model_config = ConfigDict(extra="forbid")

    model: dict[str, float | int | str]
    layers: list[LayerDiagnostics]
    bn: list[BNDiagnostics]


class EpochRecord(BaseModel):
    """One row of a QAT history. Epoch 0 is the freshly quantized pretrained model (PTQ), not training.

    The metrics are None on an epoch the run did not validate (`qat_val_interval`); the stability rule and
    the plots read only the validated epochs."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    map50_95: float | None
    map50: float | None
    precision: float | None
    recall: float | None
    box_loss: float | None = None
    cls_loss: float | None = None
    dfl_loss: float | None = None
    lr: float | None = None
    batch: int | None = None  # the batch this epoch trained at (Ultralytics may halve it after an OOM)
    oscillating_fraction: float | None = None
    seconds: float | None = None
    validation_seconds: float | None = None  # of `seconds`; None on an unvalidated epoch and in older summaries
    diagnostics: EpochDiagnostics | None = None  # of the live weights; None at epoch 0 and in older summaries


class QCLayerMovement(BaseModel):
    """How far QC moved one layer's correction from the identity (gamma = 1, beta = 0)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    max_abs_gamma_minus_1: float
    max_abs_beta: float


class PostHocResult(BaseModel):
    """A fix applied to the final (EMA) weights of a QAT run after training, evaluated before and after."""

    model_config = ConfigDict(extra="forbid")

    map50_95_before: float
    map50_95_after: float
    map50_before: float
    map50_after: float
    delta: float
    seconds: float


class QCResult(PostHocResult):
    """Quantization correction of the final weights.

    The budget (optimizer steps, lr, calibration size) and how far gamma and beta moved are recorded, so a
    reader can tell "QC did not help" from "QC could not move".
    """

    max_fold_rel_diff: float
    steps: int | None = None
    epochs: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    batch: int | None = None
    calibration_images: int | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    # QC's check that it did not make the model worse: task loss on these images (held-out, or D_c) before and
    # after; `rejected` ("QC rejected: loss rose from X to Y") when it rose and the uncorrected model was kept.
    check_set: str | None = None
    check_loss_before: float | None = None
    check_loss_after: float | None = None
    rejected: str | None = None
    max_abs_gamma_minus_1: float | None = None
    max_abs_beta: float | None = None
    layers: list[QCLayerMovement] = []


class BNResult(PostHocResult):
    """BN re-estimation of the same final weights as QC: statistics measured on this many training batches."""

    batches: int
    images: int
    data: str | None = None  # where the statistics were measured (None: a summary written before it was recorded)


class WithinSeed(BaseModel):
    """EMA − live mAP50-95 of one seed's final weights and its within-seed uncertainty (core/within_seed.py).

    Both are scored on the same val images, which a paired bootstrap resamples together: the interval is the
    val-image sampling noise of this one difference, not training noise (another seed trains other weights).
    """

    model_config = ConfigDict(extra="forbid")

    epoch: int  # the final epoch, whose EMA copy and live weights were scored
    ema_map50_95: float
    live_map50_95: float
    difference: float  # ema − live on the val set as it is
    std: float  # of the difference over resampled val sets
    ci_low: float  # 2.5 % and 97.5 % percentiles of the resampled differences
    ci_high: float
    unpaired_std: float  # √(std_ema² + std_live²) over the same draws: the spread if the images were not shared
    images: int
    resamples: int
    seed: int  # of the bootstrap's generator
    source: Literal["last epoch's validation", "evaluated again"]


FailedRule = Literal["degenerate", "collapsed", "fell_below_ptq"]


class Stability(BaseModel):
    """A verdict on one run: its status, the human reason for it, and the numbers the reason rests on.

    best and final are medians over a window of validations (`core/stability.py`): best is the highest
    running median over trained epochs, spanning epochs `best_from_epoch`..`best_epoch`; final is the
    median of the last `window` validations, `final_from_epoch`..`final_epoch`. `final_spread` is the robust
    spread (1.4826 × median absolute deviation, small-sample corrected) of those last validations: the
    run's own noise at its end.
    """

    model_config = ConfigDict(extra="forbid")

    status: Status
    reason: str
    best: float | None
    best_epoch: int | None
    final: float | None
    final_epoch: int | None
    final_over_best: float | None
    best_from_epoch: int | None = None
    final_from_epoch: int | None = None
    window: int | None = None
    final_spread: float | None = None
    ptq: float | None = None  # epoch 0: the freshly quantized pretrained model
    collapse_ratio: float | None = None  # the ratio this verdict was judged with
    failed_rules: list[FailedRule] = []  # why a completed-failed run failed; both failures can apply at once


class RunSummary(BaseModel):
    """Everything one `variant × method × seed` run produced; written as `run_summary.json`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    variant: str
    method: Method
    seed: int
    partition_key: str
    model: dict[str, Any]
    quantization: dict[str, Any]
    dataset: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    planned_epochs: int
    history: list[EpochRecord]
    diverged_at_epoch: int | None = None
    error: str | None = None
    ptq_map50_95: float | None = None
    qc: QCResult | None = None
    bn: BNResult | None = None
    stability_qat: Stability
    stability_qat_qc: Stability
    stability_qat_bn: Stability | None = None  # None only in summaries written before BN re-estimation existed
    # The same for both methods of a seed (one trajectory); None for a diverged run and in older summaries.
    within_seed: WithinSeed | None = None
    code_version: str
    package_versions: dict[str, str]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    # Comparability rests on these two fingerprints; a summary without them could never be compared.
    @field_validator("dataset")
    @classmethod
    def _dataset_has_fingerprint(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value.get("fingerprint"):
            raise ValueError("dataset must record its 'fingerprint'")
        return value

    @field_validator("training")
    @classmethod
    def _training_has_profile_fingerprint(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value.get("profile_fingerprint"):
            raise ValueError("training must record its 'profile_fingerprint'")
        return value

    def write(self, path: Path) -> Path:
        """Write atomically, so a crash never leaves a half-written summary under the final name."""
        return write_json_atomic(Path(path), self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        """Read and validate a summary; every failure raises `ArtifactError` naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"run summary {path} does not exist; materialize the stage that writes it first")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"run summary {path} is not valid JSON ({exc}); re-materialize it") from exc
        version = payload.get("schema_version") if isinstance(payload, dict) else None
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"run summary {path} has schema_version {version!r}; this code reads version {SCHEMA_VERSION} "
                "only: re-materialize it with this code version"
            )
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise ArtifactError(f"run summary {path} does not match schema version {SCHEMA_VERSION}: {exc}") from exc
