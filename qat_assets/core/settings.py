"""Every knob of the experiment in one pydantic model, resolved from a profile plus overrides.

Resolution order (later wins): the profile preset (`QAT_PROFILE`: smoke, embedded, coco), then
environment variables `QAT_<FIELD>` (for example `QAT_SEEDS=0,1,2`, `QAT_DEVICE=cuda:0`), then explicit
overrides (Dagster run config). The resolved model is recorded in asset metadata and run summaries so
that two runs can be checked for comparability.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ProfileName = Literal["smoke", "embedded", "coco"]
VARIANTS = ("yolo10n", "yolo10s", "yolo10m")
VALIDATION_VARIANTS = ("yolo10n", "yolo10s")
METHODS = ("baseline", "ema")


ULTRALYTICS_WEIGHT_DECAY = 5e-4  # what every QAT run applied before `qat_weight_decay` existed


class SettingsError(ValueError):
    """A setting (environment, run config) has a value that cannot be used; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: ProfileName

    # Data
    coco_root: Path | None = Field(None, description="COCO2017 root; unset means the embedded synthetic set")
    train_images: int = Field(gt=0, description="images drawn from the training split")
    val_images: int = Field(gt=0, description="images drawn from the validation split")
    calibration_images: int = Field(gt=0, description="size of the QC calibration set D_c (from train)")
    subset_seed: int = 0
    skip_bad_items: bool = Field(False, description="skip (and count) bad annotations/images instead of failing")
    synthetic_train_images: int = Field(gt=0, description="embedded default: images generated for train2017")
    synthetic_val_images: int = Field(gt=0, description="embedded default: images generated for val2017")
    synthetic_image_size: int = Field(gt=31, description="embedded default: side of generated images (px)")
    synthetic_difficulty: Literal["easy", "hard"] = Field(
        "easy", description="embedded default: easy (3 shapes, big objects) or hard (24 shape x hue classes, "
        "small crowded objects, clutter; core/synthetic.py), for the collapse search",
    )

    # Model and floating-point starting point
    checkpoint_dir: Path | None = Field(None, description="folder holding yolov10{n,s,m}.pt to start from")
    on_class_mismatch: Literal["reinit_head", "fail"] = "reinit_head"
    pretrain_from_scratch: bool = Field(
        True, description="without a checkpoint in checkpoint_dir, train the FP model here (the coco profile: false)"
    )
    imgsz: int = Field(gt=31)
    batch: int = Field(gt=1)
    workers: int = Field(ge=0)
    pretrain_epochs: int = Field(gt=0)
    pretrain_lr: float = Field(gt=0)
    pretrain_optimizer: str = Field(
        "auto", description="Ultralytics optimizer name; 'auto' (AdamW below 10k steps) ignores pretrain_lr"
    )
    pretrain_lrf: float = Field(0.01, gt=0, le=1, description="FP final LR as a fraction of pretrain_lr (Ultralytics lrf)")
    pretrain_lr_hold_epochs: int = Field(
        0, ge=0, description="FP epochs at the end held at the final LR (pretrain_lr x pretrain_lrf); 0 decays to the end"
    )
    pretrain_warmup_epochs: float = Field(3.0, ge=0, description="FP warmup epochs (Ultralytics warmup_epochs)")
    pretrain_nominal_batch: int = Field(
        64, gt=0, description="FP gradients accumulate over round(this / batch) batches per step (Ultralytics nbs)"
    )
    pretrain_mosaic: float = Field(1.0, ge=0, le=1, description="FP mosaic augmentation probability (Ultralytics mosaic)")
    pretrain_close_mosaic: int = Field(
        10, ge=0, description="FP epochs at the end trained without mosaic (Ultralytics close_mosaic)"
    )
    cache_images: bool = Field(False, description="hold decoded training images in RAM (Ultralytics cache='ram')")
    plateau_epochs: int = Field(10, gt=0, description="FP plateau check: window of final epochs whose gain is measured")
    plateau_min_gain: float = Field(0.01, gt=0, description="FP plateau check: the window must add less than this mAP50-95")
    pretrain_val_interval: int = Field(
        1, gt=0,
        description="FP validation every this many epochs before the plateau window; always in the window, the epoch before it and the last",
    )

    # QAT
    qat_epochs: int = Field(gt=0)
    qat_val_interval: int = Field(
        1, gt=0,
        description="QAT validates the EMA copy and the live weights every this many epochs before the final window",
    )
    qat_val_final_epochs: int = Field(
        10, gt=0, description="QAT validates every epoch of its last this many (the last epoch always)",
    )
    qat_optimizer: str = Field("Adam", description="an Ultralytics optimizer name: Adam couples weight decay into its adaptive step (L2), AdamW decouples it")
    qat_weight_decay: float = Field(
        ULTRALYTICS_WEIGHT_DECAY, ge=0, le=1, description="QAT weight decay on conv and linear weights (not BN, not biases); Ultralytics' default 5e-4",
    )
    qat_lr: float = Field(gt=0)
    weight_bit_width: int = Field(4, ge=2, le=8)
    keep_first_last_8bit: bool = True
    learned_scales: bool = True
    per_channel_scales: bool = Field(True, description="False: one weight scale per conv (Brevitas' layerwise default)")
    lsq_scales: bool = Field(
        False, description="learned scales as LSQ trains them: gradient x 1/sqrt(N*Q_p), own optimizer and LR"
    )
    scale_optimizer: Literal["Adam", "SGD"] = Field("Adam", description="with lsq_scales: the scales' optimizer")
    scale_lr: float = Field(1e-5, gt=0, description="with lsq_scales: the scales' LR (Qualcomm's oscillations-qat: 1e-5)")
    qat_lrf: float = Field(0.01, gt=0, le=1, description="QAT final LR as a fraction of qat_lr; 1 keeps the LR sustained")
    qat_warmup_epochs: float = Field(0.0, ge=0, description="Ultralytics warmup_epochs for QAT")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="training precision of FP pretraining and QAT (autocast; fake quantization stays fp32): auto is "
        "bf16 on a CUDA GPU with native bf16 (Ampere and newer), off elsewhere; evaluations are always fp32",
    )
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_tau: float | None = Field(None, description="EMA ramp constant in updates; None scales it with run length")
    oscillation_momentum: float = Field(0.01, gt=0, lt=1, description="EMA momentum of the oscillation frequency")
    oscillation_threshold: float = Field(
        0.03, gt=0, description="a weight oscillates while its frequency is above this; keep it 2-3x the momentum"
    )

    # QC
    qc_epochs: int = Field(1, gt=0)
    qc_lr: float = Field(1e-4, gt=0)
    qc_batch: int = Field(gt=1)
    qc_optimizer: Literal["SGD", "Adam"] = Field(
        "SGD", description="Adam is the paper's; SGD (momentum 0.9) corrects a known error here on every kernel family, see docs/qc_budget.md"
    )

    # BN re-estimation after QAT (Nagel et al.): training batches of `batch` images, at most this many
    bn_reestimation_batches: int = Field(50, gt=0)
    bn_reestimate_every_eval: bool = Field(
        False,
        description="also validate BN-re-estimated copies of the EMA and live weights at every QAT validation "
        "(the reference's evaluation protocol), recorded as a +BN curve; costs a forward pass over "
        "bn_reestimation_batches training batches and two validations per validated epoch",
    )

    # Deployment (ONNX export)
    onnx_source: Literal["qc", "qat"] = Field(
        "qc", description="export the QC-folded model (qc) or the QAT checkpoint's EMA weights (qat, e.g. an older run)"
    )
    onnx_opset: int = Field(17, ge=13, le=21, description="ONNX opset (per-channel DequantizeLinear needs >= 13)")
    onnx_int4: bool = Field(True, description="also write the W4 file with packed INT4 weights (opset 21 DequantizeLinear)")
    onnx_parity_images: int = Field(8, gt=0, description="val images in the onnxruntime vs PyTorch parity batch")
    onnx_cpu_val_images: int = Field(
        500, gt=0, description="on a GPU step whose onnxruntime has no CUDA provider, the export measures the ONNX "
        "files' mAP (and PyTorch's beside them) on the first this many val images instead of all of them",
    )

    # Gate
    seeds: tuple[int, ...] = (0, 1)
    gate_min_seeds: int = Field(2, gt=0)
    collapse_ratio: float = Field(0.5, gt=0, lt=1)
    degenerate_map: float = Field(0.01, ge=0, description="best mAP50-95 at or below this is degenerate")
    stability_window: int = Field(
        3, gt=0, description="best and final are medians over this many validations (fewer if fewer were made)"
    )
    within_seed_resamples: int = Field(
        1000, ge=2,
        description="resamples of the paired bootstrap over val images of each seed's final EMA - live difference "
        "(the within-seed uncertainty); each costs two mAP computations on the whole val set",
    )
    gate_require_informative: bool = Field(
        False, description="the gate passes only when every variant's baseline collapsed in some seed"
    )

    # Automation
    backfill_cron: str = Field("0 2 * * *", description="when the seed backfill schedule ticks")

    # Execution
    device: str = Field("", description="cpu, cuda:0, ...; empty picks the first GPU if any, else CPU")
    storage: Path | None = Field(None, description="artifact root; default $DAGSTER_HOME/artifacts")
    launcher: Literal["local", "ray"] = Field(
        "local", description="where heavy steps run: local subprocesses, or Ray jobs on the cluster at ray_address"
    )
    ray_address: str = Field("", description="Ray dashboard (job submission) address, http://HEAD:8265")
    ray_gpus_per_step: float | None = Field(
        None, ge=0, description="GPUs each Ray job asks for; unset: 1 when the device is cuda*, else 0"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        # One device per worker: several GPUs are shared out through QAT_GPU_IDS, never as `cuda:0,1` (DDP).
        if not re.fullmatch(r"(cpu|mps|cuda(:\d+)?)?", value):
            raise ValueError(f"device {value!r} is not one of cpu, mps, cuda, cuda:N (for several GPUs use QAT_GPU_IDS)")
        return value

    @field_validator("ray_address")
    @classmethod
    def _check_ray_address(cls, value: str) -> str:
        # dagster-ray submits jobs through the dashboard's HTTP API; a `ray://` client address is a different server.
        if value and not re.fullmatch(r"https?://[^/\s]+/?", value):
            raise ValueError(
                f"ray_address {value!r} is not the Ray dashboard address; use http://HEAD_HOST:8265 "
                "(the job-submission server, not ray:// or HOST:6379)"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_pretrain_lr_hold(self) -> "Settings":
        if self.pretrain_lr_hold_epochs >= self.pretrain_epochs:
            raise ValueError(
                f"pretrain_lr_hold_epochs {self.pretrain_lr_hold_epochs} leaves no epoch of LR decay in "
                f"{self.pretrain_epochs} pretrain_epochs; hold fewer epochs or train more"
            )
        return self

    @model_validator(mode="after")
    def _check_qat_val_cadence(self) -> "Settings":
        # The collapse rule's final is the median of the last stability_window validations: with sparse
        # validation it must read consecutive final epochs, not reach back to epochs qat_val_interval apart.
        if (self.qat_val_interval > 1 and self.qat_val_final_epochs < min(self.stability_window, self.qat_epochs)):
            raise ValueError(
                f"qat_val_final_epochs {self.qat_val_final_epochs} is shorter than stability_window "
                f"{self.stability_window}: with qat_val_interval {self.qat_val_interval} the final median would "
                "span epochs validated that far apart; validate at least stability_window final epochs"
            )
        return self

    @model_validator(mode="after")
    def _check_lsq_scales(self) -> "Settings":
        if self.lsq_scales and not self.learned_scales:
            raise ValueError("lsq_scales trains learned scales; set learned_scales=true too (or lsq_scales=false)")
        if self.lsq_scales and self.amp == "fp16":
            raise ValueError("lsq_scales needs amp bf16, auto or off: fp16's GradScaler unscales the weights' optimizer only")
        return self

    @model_validator(mode="after")
    def _check_amp_device(self) -> "Settings":
        # PyTorch's CPU autocast computes in bf16 (what the tests use to run the GPU path's mixed precision); fp16
        # needs a GradScaler, which only CUDA training here has. An empty device is resolved when a step runs.
        if self.amp == "fp16" and self.device and not self.device.startswith("cuda"):
            raise ValueError(f"amp fp16 needs a CUDA device, not {self.device!r}: use amp bf16, auto or off")
        if self.amp == "bf16" and self.device == "mps":
            raise ValueError("amp bf16 runs on CUDA or the CPU, not on mps: use amp off")
        return self

    @model_validator(mode="after")
    def _check_fp_start(self) -> "Settings":
        # At COCO scale an FP model trained here costs days and stays below release accuracy: asked for, not fallen into.
        if self.checkpoint_dir is None and not self.pretrain_from_scratch:
            raise ValueError(
                "QAT_CHECKPOINT_DIR is unset and QAT_PRETRAIN_FROM_SCRATCH is false (the coco profile's default: "
                f"{self.pretrain_epochs} FP epochs at {self.imgsz} px take days): set QAT_CHECKPOINT_DIR to a folder "
                "holding yolov10n.pt / yolov10s.pt / yolov10m.pt, or QAT_PRETRAIN_FROM_SCRATCH=true to train them here"
            )
        return self

    @model_validator(mode="after")
    def _check_launcher(self) -> "Settings":
        if self.launcher == "ray" and not self.ray_address:
            raise ValueError("launcher 'ray' needs ray_address: set QAT_RAY_ADDRESS=http://HEAD_HOST:8265")
        if self.launcher == "local" and (self.ray_address or self.ray_gpus_per_step is not None):
            raise ValueError(
                "ray_address / ray_gpus_per_step are set but launcher is 'local'; set QAT_LAUNCHER=ray to use the cluster"
            )
        return self

    def ray_gpus(self) -> float:
        """GPUs one Ray job asks for: one when the run targets CUDA, none on CPU, unless set explicitly."""
        if self.ray_gpus_per_step is not None:
            return self.ray_gpus_per_step
        return 1.0 if self.device.startswith("cuda") else 0.0

    @field_validator("oscillation_threshold")
    @classmethod
    def _check_oscillation_threshold(cls, value: float, info: Any) -> float:
        # One flip lifts a weight's frequency to exactly the momentum: a threshold at or below it would count
        # every weight that changed once in the last ~100 steps as oscillating (Nagel et al. use 2-3x).
        momentum = info.data.get("oscillation_momentum")
        if momentum is not None and value < 2 * momentum:
            raise ValueError(f"oscillation_threshold {value:g} must be at least 2x oscillation_momentum {momentum:g}")
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _parse_seeds(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return tuple(int(p) for p in parts)
            except ValueError as exc:
                raise ValueError(f"seeds must be comma-separated integers, got {value!r}") from exc
        return value

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("at least one seed is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return tuple(sorted(value))

    def artifact_root(self) -> Path:
        if self.storage is not None:
            return self.storage
        home = os.environ.get("DAGSTER_HOME")
        if not home:
            raise RuntimeError("set QAT_STORAGE or DAGSTER_HOME: artifacts need a persistent folder")
        return Path(home) / "artifacts"

    def training_profile(self) -> dict[str, Any]:
        """The settings that make two QAT runs comparable (device, paths and seeds excluded). `amp` is not one:
        what it resolves to on the step's device is (`auto` is bf16 on one GPU, fp32 on another), compared as
        the run's `training_precision` (core/comparison.py `comparability_key`)."""
        keys = (
            "profile", "imgsz", "batch", "pretrain_epochs", "pretrain_lr", "qat_epochs", "qat_optimizer",
            "qat_lr", "weight_bit_width", "keep_first_last_8bit", "learned_scales", "ema_decay", "ema_tau",
            "qc_epochs", "qc_lr", "qc_batch", "qc_optimizer", "calibration_images", "bn_reestimation_batches",
            "pretrain_lrf", "pretrain_optimizer", "per_channel_scales", "qat_lrf", "qat_warmup_epochs",
            "lsq_scales", "scale_optimizer", "scale_lr",
        )
        return {**{k: getattr(self, k) for k in keys}, **self.added_training_fields()}

    def added_training_fields(self) -> dict[str, Any]:
        """Training settings added after runs were recorded, present only where they differ from what those runs
        did, so the fingerprints of earlier trajectories and summaries stay valid (as fp32 adds nothing for
        `amp`): the weight decay (Ultralytics applied 5e-4 before it was a setting), and the QAT validation
        cadence, which is not the weights but what is measured of them (a sparser one can miss the peak a
        collapse ratio divides by). The cadence is normalized: with every epoch validated, the final window
        changes nothing."""
        fields: dict[str, Any] = {}
        if self.qat_weight_decay != ULTRALYTICS_WEIGHT_DECAY:
            fields["qat_weight_decay"] = self.qat_weight_decay
        if self.qat_val_interval != 1:
            fields["qat_validation_cadence"] = [self.qat_val_interval, min(self.qat_val_final_epochs, self.qat_epochs)]
        return fields

    def training_profile_fingerprint(self) -> str:
        blob = json.dumps(self.training_profile(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint_of(self, fields: tuple[str, ...]) -> str:
        """Short hash of the named settings: what a stage's saved state must match to be resumed."""
        blob = json.dumps({k: getattr(self, k) for k in fields}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_metadata(self) -> dict[str, str]:
        """Every resolved value as text, ready for asset metadata."""
        return {k: str(v) for k, v in self.model_dump().items()}


# The settings each heavy stage's result depends on. Resuming or reusing a stage's state checks only
# these, so changing, say, a QC knob never retrains the FP model or restarts QAT.
PRETRAIN_FIELDS = (
    "imgsz", "batch", "pretrain_epochs", "pretrain_lr", "pretrain_lrf", "pretrain_optimizer", "pretrain_lr_hold_epochs", "pretrain_warmup_epochs",
    "pretrain_nominal_batch", "pretrain_mosaic", "pretrain_close_mosaic", "pretrain_val_interval", "plateau_epochs",
)
QAT_FIELDS = (
    "imgsz", "batch", "qat_epochs", "qat_optimizer", "qat_lr", "weight_bit_width", "keep_first_last_8bit",
    "learned_scales", "ema_decay", "ema_tau", "oscillation_momentum", "oscillation_threshold",
    "per_channel_scales", "qat_lrf", "qat_warmup_epochs", "lsq_scales", "scale_optimizer", "scale_lr",
)
# Beside these, a trajectory's fingerprint holds `Settings.added_training_fields()` (core/qat.py).
# `amp` is in neither list: what it resolves to on the step's device (`auto` is bf16 on a GPU, fp32 on the CPU)
# is part of the FP and QAT fingerprints instead (core/pretrain.py, core/qat.py `trajectory_fingerprint`).

PROFILES: dict[str, dict[str, Any]] = {
    # Seconds per heavy step: just enough data to go through every real code path.
    "smoke": dict(
        train_images=16, val_images=8, calibration_images=8,
        synthetic_train_images=16, synthetic_val_images=8, synthetic_image_size=64,
        imgsz=64, batch=8, workers=0, pretrain_epochs=1, pretrain_lr=0.01,
        qat_epochs=2, qat_lr=1e-4, qc_epochs=16, qc_lr=1e-3, qc_batch=8, within_seed_resamples=200,
        # one pass over the 16 training images: the default 50 batches would cycle them 25 times (a minute here)
        bn_reestimation_batches=2,
    ),
    # The whole ladder on a 2-core CPU. The FP recipe (docs/fp_recipe.md) brings yolov10n and yolov10s to
    # their plateau in 50 epochs at 64 px: one AdamW step per batch of 8 (32 steps an epoch), LR decayed over
    # 40 epochs and held at 2 % for the 10 the plateau check reads; no mosaic, whose 2x canvas would halve
    # 64 px objects. Probed with two FP seeds per variant, all four at plateau (0.618-0.658); decayed over 30
    # epochs instead, one stream passed and another left both variants NOT at plateau (+0.014).
    # No data-loader processes: 64 px images cached in RAM cost little to load, and with two heavy steps at
    # once on 2 cores their loaders competed with training (ladder 18.6 min against 19.2; FP and QAT
    # bit-identical). FP validates every 5th epoch before the plateau window (18 of 50 validations): the
    # check reads the window in full and the best before it, which fewer points can only understate.
    "embedded": dict(
        train_images=256, val_images=64, calibration_images=64,
        synthetic_train_images=256, synthetic_val_images=64, synthetic_image_size=64,
        imgsz=64, batch=8, workers=0, pretrain_epochs=50, pretrain_optimizer="AdamW", pretrain_lr=0.004,
        pretrain_lrf=0.02, pretrain_lr_hold_epochs=10, pretrain_warmup_epochs=1, pretrain_nominal_batch=8,
        pretrain_mosaic=0.0, cache_images=True, pretrain_val_interval=5,
        # QC: SGD lr 1e-3 won back >= 50 % of a known error in every cell of docs/qc_budget.md's sweep (seeds x
        # CPU kernel families), with the highest minimum of the SGD lrs (3e-3, the earlier default, lower)
        qat_epochs=4, qat_lr=1e-4, qc_epochs=8, qc_lr=1e-3, qc_batch=8,
    ),
    # Paper-like recipe on a GPU with real COCO (WACV'24: ~100 QAT epochs, Adam 1e-4, one QC epoch). The
    # within-seed bootstrap recomputes mAP on 5000 images' statistics per resample (1.6-5 s on a CPU), so 200.
    # QAT validation cadence: every epoch (qat_val_interval=1) is within the 10 % budget. An epoch trains
    # 118,287 images (forward + backward through fake-quant: >= 3 forwards each) and validates 2 x 5,000
    # (EMA copy and live weights, one forward each on frozen quantized weights, plus NMS and matching), so
    # validation costs 10,000 r / 118,287 = 8.5 % x r of the training, r = the cost of one val image over
    # one training image: 2.8 % when compute-bound (r = 1/3), less when loader-bound (mosaic decodes 4
    # images per training sample, validation 1, with twice the workers). It stays within 10 % up to r = 1.18.
    # Not measured on a GPU here: each epoch records `validation_seconds` beside `seconds` to check it.
    # bn_reestimate_every_eval doubles the validations and adds 2 x 50 x 32 = 3,200 training images forward
    # only (1/3 each): (20,000 r + 1,067) / 118,287 = 16.9 % x r + 0.9 %, over 10 % from r = 0.54; with it on,
    # set qat_val_interval=2 unless the recorded validation_seconds show otherwise.
    "coco": dict(
        train_images=118287, val_images=5000, calibration_images=1024,
        synthetic_train_images=512, synthetic_val_images=128, synthetic_image_size=640,
        imgsz=640, batch=32, workers=8, pretrain_epochs=100, pretrain_lr=0.01, pretrain_from_scratch=False,
        qat_epochs=100, qat_lr=1e-4, qc_batch=32, qc_optimizer="Adam", qat_val_interval=1,
        within_seed_resamples=200,
    ),
}


def _environment_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = environ.get(f"QAT_{name.upper()}")
        if value is not None and name != "profile":
            overrides[name] = value if value != "" or name == "device" else None
    return overrides


def load_settings(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Resolve settings: profile preset, then `QAT_*` environment variables, then `overrides`."""
    environ = dict(os.environ if environ is None else environ)
    profile = (overrides or {}).get("profile") or environ.get("QAT_PROFILE") or "embedded"
    if profile not in PROFILES:
        raise SettingsError(f"QAT_PROFILE={profile!r} is not a profile; choose one of {sorted(PROFILES)}")
    values: dict[str, Any] = {"profile": profile, **PROFILES[profile], **_environment_overrides(environ)}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"QAT_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings for profile {profile!r}: {problems}") from None
