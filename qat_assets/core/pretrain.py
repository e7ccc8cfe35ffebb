"""The floating-point starting point of a variant: the user's weights, or trained here on the subset."""

from __future__ import annotations

import hashlib
import shutil
import time
from typing import Callable

import torch

from .artifacts import save_checkpoint
from .evaluate import evaluate_model, evaluation_settings, resolve_device
from .models import CheckpointError, build_detection_model, read_user_checkpoint
from .requests import PretrainRequest
from .settings import PRETRAIN_FIELDS
from .trainer import (
    ResumableTrainer, ema_schedule, load_resume_state, resolve_precision, trainer_overrides, training_batch,
)
from .validation_cadence import validated_fp_epochs

CHECKPOINT_NAME = "pretrained.pt"
# One fixed seed for the FP model, so every method and QAT seed starts from the same weights.
PRETRAIN_SEED = 0


def plateau_check(history: list[dict], epochs: int, min_gain: float) -> dict:
    """Is the FP model at its plateau? The gain of the last `epochs` epochs over everything before them.

    Gain = best mAP50-95 of the last `epochs` epochs - best mAP50-95 before them (best, not the last
    value, so one noisy validation neither hides nor fakes progress). At the plateau when gain < min_gain,
    i.e. training `epochs` more epochs is expected to add less than `min_gain`. Measured from the run's
    own history, whose epochs without a validation (None) are left out; it cannot tell without a validated
    epoch in the window and one before it.

    The check is only as strong as the LR the window trained at: a model flat at a tiny LR can still
    learn at a larger one (QAT's, say). So the window's largest LR is recorded beside the gain
    (`window_max_lr`, None for a history without LRs) and named in the reason.
    """
    trained = [h for h in sorted(history, key=lambda h: h["epoch"]) if h["epoch"] > 0]
    result = {"window_epochs": epochs, "min_gain": min_gain, "gain": None, "at_plateau": None, "window_max_lr": None}
    last_before = trained[-1]["epoch"] - epochs if trained else 0
    window = [h for h in trained if h["epoch"] > last_before]
    in_window = [h["map50_95"] for h in window if h.get("map50_95") is not None]
    before = [h["map50_95"] for h in trained if h["epoch"] <= last_before and h.get("map50_95") is not None]
    if last_before < 1 or not in_window or not before:
        result["reason"] = (
            f"{len(trained)} FP epochs in the history, {len(in_window)} validated in the last {epochs} and "
            f"{len(before)} before them; the check needs more than {epochs} epochs and a validation in each part"
        )
        return result
    gain = max(in_window) - max(before)
    window_lrs = [h["lr"] for h in window if h.get("lr") is not None]
    window_max_lr = max(window_lrs) if window_lrs else None
    result.update(gain=gain, at_plateau=gain < min_gain, window_max_lr=window_max_lr)
    result["reason"] = (
        f"the last {epochs} epochs added {gain:+.4f} mAP50-95 "
        f"({'below' if gain < min_gain else 'not below'} {min_gain})"
        f"{f' at LR <= {window_max_lr:.2g}' if window_max_lr is not None else ''}: "
        f"{'at' if gain < min_gain else 'NOT at'} plateau"
    )
    return result


def describe_epoch(record: dict) -> str:
    losses = " ".join(f"{k}={record[k]:.3f}" for k in ("box_loss", "cls_loss", "dfl_loss") if record.get(k) is not None)
    metrics = (
        f"mAP50-95 {record['map50_95']:.4f}, mAP50 {record['map50']:.4f}, P {record['precision']:.3f}, R {record['recall']:.3f}"
        if record.get("map50_95") is not None else "not validated"
    )
    return f"epoch {record['epoch']}: {metrics}, {losses}, {record.get('seconds') or 0:.1f}s"


def run_pretrain(request: PretrainRequest, log: Callable[[str], None]) -> dict:
    settings = request.settings
    device = resolve_device(settings.device)
    started = time.time()
    user_checkpoint = (
        settings.checkpoint_dir / f"yolov10{request.variant[-1]}.pt" if settings.checkpoint_dir else None
    )
    if user_checkpoint is not None and user_checkpoint.is_file():
        model, head = read_user_checkpoint(user_checkpoint, request.variant, request.names, settings.on_class_mismatch)
        source = f"user-checkpoint:{user_checkpoint}"
        epochs = settings.pretrain_epochs if head["head"] == "re-initialised" else 0
        log(f"{request.variant}: starting from {user_checkpoint} (head {head['head']}, {epochs} fine-tune epochs)")
    elif not settings.pretrain_from_scratch:
        raise CheckpointError(
            f"no {user_checkpoint.name} in QAT_CHECKPOINT_DIR={settings.checkpoint_dir}, and QAT_PRETRAIN_FROM_SCRATCH "
            f"is false (the coco profile's default): put the release checkpoint there, or set "
            f"QAT_PRETRAIN_FROM_SCRATCH=true to train {request.variant} here ({settings.pretrain_epochs} FP epochs)"
        )
    else:
        # Seeded here: the weights are initialised before Ultralytics' trainer seeds anything, so without
        # this every run starts from different random weights (the 0.318-0.366 spread of identical runs).
        torch.manual_seed(PRETRAIN_SEED)
        model, head = build_detection_model(request.variant, request.names), {"head": "new"}
        source, epochs = "trained-here", settings.pretrain_epochs
        log(f"{request.variant}: no checkpoint in QAT_CHECKPOINT_DIR; training {epochs} FP epochs here")

    run_dir = request.out_dir / "run"
    history: list[dict] = []
    ema: dict | None = None
    if epochs:
        precision = resolve_precision(settings.amp, device)
        fingerprint = hashlib.sha256(
            f"{request.dataset_fingerprint}|{settings.fingerprint_of(PRETRAIN_FIELDS)}|{source}|{request.variant}"
            # fp32 adds nothing, so FP states trained before the amp setting existed (all fp32) are still reused
            f"{'' if precision == 'off' else '|' + precision}".encode()
        ).hexdigest()[:16]
        state, history, note = load_resume_state(run_dir, fingerprint, epochs)
        log(f"{request.variant} pretraining: {note}")
        if state is not None and int(state["epoch"]) >= epochs:
            model.load_state_dict(state["ema"])
        else:
            batches_per_epoch = -(-request.train_images // settings.batch)
            accumulate = max(round(settings.pretrain_nominal_batch / settings.batch), 1)  # as Ultralytics' nbs
            trainer = ResumableTrainer(
                model=model,
                overrides={
                    **trainer_overrides(settings, request.variant, request.dataset_yaml, run_dir, device, epochs, seed=PRETRAIN_SEED),
                    "optimizer": settings.pretrain_optimizer, "lr0": settings.pretrain_lr, "lrf": settings.pretrain_lrf,
                    "warmup_epochs": settings.pretrain_warmup_epochs, "nbs": settings.pretrain_nominal_batch,
                    "mosaic": settings.pretrain_mosaic, "close_mosaic": settings.pretrain_close_mosaic,
                    "cache": "ram" if settings.cache_images else False,
                },
                run_dir=run_dir,
                precision=resolve_precision(settings.amp, device),
                # Ultralytics' FP decay 0.9999, with window and ramp scaled to the run like QAT's: a fixed
                # tau of 2000 would keep the EMA copy equal to the live model over a short CPU run.
                ema=(ema := ema_schedule(0.9999, None, epochs * batches_per_epoch // accumulate, batches_per_epoch // accumulate)),
                on_epoch=lambda record: log(f"{request.variant} pretrain {describe_epoch(record)}"),
                state_fingerprint=fingerprint,
                resume_state=state,
                history=history,
                lr_hold_epochs=settings.pretrain_lr_hold_epochs,
                validate_epoch=validated_fp_epochs(epochs, settings.pretrain_val_interval, settings.plateau_epochs),
            )
            trainer.train()
            history = trainer.history
            model = trainer.ema.ema  # Ultralytics' deliverable is the EMA copy
    evaluation = evaluation_settings(settings.imgsz, settings.batch)
    metrics = evaluate_model(
        model, request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch, device=device,
        workers=settings.workers, work_dir=request.out_dir / "eval",
    )
    # YOLOv10's NMS-free (one-to-one) head alone (Ultralytics' `nms=False`): every QAT run of this FP start
    # compares its final weights' head with it, so it is measured once, here.
    one_to_one = evaluate_model(
        model, request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch, device=device,
        workers=settings.workers, work_dir=request.out_dir / "eval_one_to_one", nms=False,
    )
    log(f"{request.variant} FP reference on val: mAP50-95 {metrics['map50_95']:.4f}, mAP50 {metrics['map50']:.4f}; "
        f"NMS-free (one-to-one) head mAP50-95 {one_to_one['map50_95']:.4f}")
    batch = training_batch(history, settings.batch)
    if batch["halved"]:
        log(f"{request.variant}: Ultralytics halved the FP batch after running out of memory: trained at "
            f"{batch['used']}, not the configured {settings.batch}")
    plateau = plateau_check(history, settings.plateau_epochs, settings.plateau_min_gain)
    log(f"{request.variant} FP plateau check: {plateau['reason']}")
    sidecar = {
        "variant": request.variant, "names": request.names, "source": source, "head": head,
        "epochs_trained": epochs, "metrics": metrics, "one_to_one_metrics": one_to_one, "evaluation": evaluation,
        "training_batch": batch,
        "dataset_fingerprint": request.dataset_fingerprint, "history": history, "plateau": plateau, "ema": ema,
        "seconds": time.time() - started, "device": device, "settings": settings.model_dump(mode="json"),
        "training_precision": resolve_precision(settings.amp, device) if epochs else None,
    }
    checkpoint = request.out_dir / CHECKPOINT_NAME
    digest = save_checkpoint(checkpoint, {"model": model.float().state_dict()}, sidecar)
    shutil.rmtree(run_dir / "ultralytics", ignore_errors=True)  # label caches and results.csv, not artifacts
    return {"checkpoint": str(checkpoint), "sha256": digest, **sidecar}
