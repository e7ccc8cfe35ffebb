"""What a ladder costs before it runs: per stage, images x epochs x seconds per image, on 1 and N GPU slots.

Seconds per image come, in order of preference, from this storage's own sidecars (a QAT or FP run already
made under the same training profile: its per-epoch wall seconds, validation included), from the user
(`qat-ladder --plan --seconds-per-image`), or from the built-in table below, whose source each row names.
Only the FP training figure is needed per variant: the other stages follow from it by the ratios measured in
`benchmarks/bench_qat.py` (README, "Step benchmark"), which the output prints. Nothing here runs a model.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .settings import METHODS, Settings
from .validation_cadence import validated_fp_epochs, validated_qat_epochs

# Per training image (forward and backward) relative to an FP training image, and per evaluated image
# (forward, NMS) likewise: bench_qat.py at 64 px x 8 on one CPU thread, yolov10n / yolov10s:
# QAT 221.5 / 136.8 ms = 1.62 and 665.0 / 416.1 = 1.60; QC 0.52 of QAT per image (0.84 of FP);
# evaluation 44.3 / 136.8 = 0.32 and 138.7 / 416.1 = 0.33.
QAT_OVER_FP = 1.6
QC_OVER_FP = 0.84
EVAL_OVER_FP = 0.33

# FP training seconds per image (a training image's share of its epoch: loading, augmentation, the step).
# - smoke / embedded: measured on this repository's 2-core CPU, 64 px, one torch thread per step, in the L10
#   embedded ladder (README, "The embedded ladder"): the FP starts took 477 s (yolov10n) and 1005 s (yolov10s)
#   for 50 epochs of 256 images and 19 validations of 64, so 477 / (12,800 + 0.33 x 1,216) = 0.0361 s and
#   0.0761 s. (bench_qat.py's bare step, 136.8 / 8 and 416.1 / 8 ms, is half of that: no data, no EMA, no
#   loss bookkeeping.) yolo10m: not measured; yolov10s' figure x 59.1 / 21.6 GFLOPs.
# - coco: an ESTIMATE, not a measurement (no GPU here). Ultralytics' YOLOv5 README gives 1 / 2 / 4 days for
#   YOLOv5n / s / m, 300 COCO epochs (118,287 images, 640 px) on one V100 with AMP: 2.44 / 4.88 / 9.75 ms per
#   image. Scaled by FLOPs at 640 px (YOLOv10 n/s/m 6.7 / 21.6 / 59.1 G, YOLOv5 n/s/m 4.5 / 16.5 / 49.0 G):
#   3.6 / 6.4 / 11.8 ms. A newer GPU is faster, a data loader short of cores slower: measure and override.
FP_SECONDS_PER_IMAGE = {
    "cpu": ({"yolo10n": 0.0361, "yolo10s": 0.0761, "yolo10m": 0.208},
            "measured: the L10 embedded ladder's FP starts, this repository's 2-core CPU, 64 px, one thread per "
            "step (yolo10m: scaled by FLOPs)"),
    "gpu": ({"yolo10n": 0.0036, "yolo10s": 0.0064, "yolo10m": 0.0118},
            "ESTIMATE: one V100-class GPU, 640 px, AMP, from Ultralytics' published YOLOv5 COCO training "
            "times scaled by FLOPs; override with --seconds-per-image"),
}


@dataclass(frozen=True)
class Stage:
    """One stage of one variant: `runs` runs, each `train_images` x `epochs` trained and `eval_images` evaluated."""

    variant: str
    name: str
    runs: int
    train_images: int
    epochs: int
    train_seconds_per_image: float
    eval_images: int
    eval_seconds_per_image: float
    source: str

    @property
    def seconds_per_run(self) -> float:
        return (self.train_images * self.epochs * self.train_seconds_per_image
                + self.eval_images * self.eval_seconds_per_image)

    @property
    def seconds(self) -> float:
        return self.runs * self.seconds_per_run

    def arithmetic(self) -> str:
        train = (f"{self.train_images:,} x {self.epochs} x {self.train_seconds_per_image:.4g} s"
                 if self.epochs else "")
        evaluation = f"{self.eval_images:,} x {self.eval_seconds_per_image:.4g} s" if self.eval_images else ""
        per_run = " + ".join(part for part in (train, evaluation) if part) or "0"
        return f"{self.runs} x ({per_run})"


def fp_seconds_per_image(settings: Settings, override: dict[str, float]) -> tuple[dict[str, float], str]:
    """FP training seconds per image per variant, and where they come from."""
    table, source = FP_SECONDS_PER_IMAGE["gpu" if settings.profile == "coco" else "cpu"]
    if not override:
        return dict(table), source
    if "*" in override:
        return {v: override["*"] for v in table}, "given (--seconds-per-image)"
    return {**table, **override}, f"given for {', '.join(sorted(override))} (--seconds-per-image); others: {source}"


# What a stage's epoch wall time depends on besides the model: a sidecar whose recorded value differs says
# nothing about this plan's epochs (the cadence and the +BN curve change how much validation an epoch holds).
EPOCH_COST_FIELDS = {
    "pretrain": ("profile", "imgsz", "batch", "pretrain_val_interval"),
    "qat": ("profile", "imgsz", "batch", "qat_val_interval", "qat_val_final_epochs", "bn_reestimate_every_eval"),
}


def measured_epoch_seconds(
    root: Path | None, settings: Settings, variant: str, stage: str, precision: str | None = None
) -> tuple[float, str] | None:
    """Mean wall seconds of one epoch (training and its validations) in this storage's sidecars of `stage`
    (`qat` or `pretrain`) for `variant`, from runs made at this plan's EPOCH_COST_FIELDS and, when given, its
    training `precision` (bf16 epochs say nothing about fp32 ones; a sidecar without one trained in fp32);
    None without any. The mean, not the median: under a sparse cadence most epochs hold no validation, and
    the median epoch would leave the validations out."""
    if root is None:
        return None
    if stage == "qat":
        sidecars = sorted((root / variant / "qat_checkpoint").glob("*/qat_checkpoint.json"))
    else:
        sidecars = [layout.pretrained_dir(root, variant) / "pretrained.json"]
    seconds, used = [], []
    for path in sidecars:
        try:
            sidecar = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        recorded = sidecar.get("settings") or {}
        if any(recorded.get(field, getattr(settings, field)) != getattr(settings, field) for field in EPOCH_COST_FIELDS[stage][1:]) \
                or recorded.get("profile") != settings.profile:
            continue
        if precision is not None and (sidecar.get("training_precision") or "off") != precision:
            continue
        epochs = [h["seconds"] for h in sidecar.get("history", []) if h.get("epoch", 0) > 0 and h.get("seconds")]
        if epochs:
            seconds += epochs
            used.append(path)
    if not seconds:
        return None
    return statistics.fmean(seconds), f"measured: mean of {len(seconds)} epochs in {len(used)} sidecar(s) under {root}"


def planned_images(settings: Settings) -> tuple[int, int]:
    """(train, val) images the subset will hold: the profile's counts, at most what the embedded set generates
    when no COCO root is set."""
    if settings.coco_root is not None:
        return settings.train_images, settings.val_images
    return (min(settings.train_images, settings.synthetic_train_images),
            min(settings.val_images, settings.synthetic_val_images))


def stages(settings: Settings, variants: tuple[str, ...], fp_per_image: dict[str, float], source: str,
           root: Path | None = None, fp_epochs: int | None = None, precision: str | None = None) -> list[Stage]:
    """Every heavy stage of `variants` at `settings`; `fp_epochs` None trains the FP start here unless a
    checkpoint folder is set (then 0: the release checkpoint is used as it is). `precision`: the training
    precision the steps will run at, which measured epochs must match."""
    seeds, partitions = len(settings.seeds), len(settings.seeds) * len(METHODS)
    train, val = planned_images(settings)
    if fp_epochs is None:
        fp_epochs = 0 if settings.checkpoint_dir is not None else settings.pretrain_epochs
    result = []
    for variant in variants:
        fp = fp_per_image[variant]
        evaluate = EVAL_OVER_FP * fp
        fp_validated = validated_fp_epochs(fp_epochs, settings.pretrain_val_interval, settings.plateau_epochs)
        validated_fp = sum(1 for epoch in range(1, fp_epochs + 1) if fp_validated(epoch))
        qat_validated = validated_qat_epochs(settings.qat_epochs, settings.qat_val_interval, settings.qat_val_final_epochs)
        # the +BN curve validates a re-estimated EMA copy and live weights beside them (BN's batches not counted)
        per_validated_epoch = 4 if settings.bn_reestimate_every_eval else 2
        validated_qat = sum(1 for epoch in range(1, settings.qat_epochs + 1) if qat_validated(epoch))
        # The FP start: its validated epochs, then its reference and its NMS-free head (2).
        fp_stage = Stage(variant, "FP start", 1, train, fp_epochs, fp, val * (validated_fp + 2), evaluate, source)
        # One QAT training per seed, both methods: per validated epoch the EMA copy and the live weights; PTQ
        # before; and in each method's run the NMS-free head of its final weights (2).
        qat = Stage(variant, "QAT (one per seed)", seeds, train, settings.qat_epochs, QAT_OVER_FP * fp,
                    val * (per_validated_epoch * validated_qat + 1 + 2), evaluate, source)
        for stage_name, measured in (("pretrain", fp_epochs), ("qat", settings.qat_epochs)):
            found = measured_epoch_seconds(root, settings, variant, stage_name, precision) if measured else None
            if found is None:
                continue
            epoch_seconds, where = found
            # The measured epoch holds its validations: per training image, they are already in. Left: the FP
            # reference and its NMS-free head; PTQ and each method's final NMS-free head.
            if stage_name == "pretrain":
                fp_stage = Stage(variant, fp_stage.name, 1, train, fp_epochs, epoch_seconds / train, val * 2, evaluate, where)
            else:
                qat = Stage(variant, qat.name, seeds, train, settings.qat_epochs, epoch_seconds / train, val * 3,
                            evaluate, where)
        # QC on the calibration set, before/after evaluations and the held-out check; BN re-estimation's
        # batches and its evaluation; the export's PyTorch and ONNX evaluations.
        post = Stage(variant, "QC + BN + export (per partition)", partitions, settings.calibration_images,
                     settings.qc_epochs, QC_OVER_FP * fp,
                     val * 5 + settings.calibration_images + min(settings.bn_reestimation_batches * settings.batch, train),
                     evaluate, source)
        result += [fp_stage, qat, post]
    return result


@dataclass(frozen=True)
class Split:
    slots: int
    total_seconds: float
    longest_chain_seconds: float

    @property
    def wall_seconds(self) -> float:
        """At least this: the work shared evenly by the slots, and never less than the longest chain of steps
        that must follow one another (a variant's FP start, one seed's QAT, one partition's QC and export)."""
        return max(self.total_seconds / self.slots, self.longest_chain_seconds)


def split(all_stages: list[Stage], slots: int) -> Split:
    chains: dict[str, float] = {}
    for stage in all_stages:
        chains[stage.variant] = chains.get(stage.variant, 0.0) + stage.seconds_per_run
    return Split(slots, sum(s.seconds for s in all_stages), max(chains.values(), default=0.0))


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
