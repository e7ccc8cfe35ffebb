"""The QC stage of one (variant, method, seed): QAT EMA weights in, folded `qc_checkpoint.pt` out.

Evaluation before and after uses exactly the QAT evaluation settings, on frozen copies (the quantized
weights computed once), so the delta is QC's effect alone. "Before" is QAT's own last evaluation of the
same EMA weights when the settings match (`qat_final_evaluation`), rather than the same evaluation again.

The same step also runs BN re-estimation (the statistics-only mitigation of Nagel et al.) on a copy of the
same QAT weights and records its outcome beside QC's: both start from the one checkpoint, and a second
worker process would cost another torch import for a few seconds of work. Its model is not saved: the
+BN row is a measurement, not a deliverable.
"""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from .artifacts import load_checkpoint, read_sidecar, save_checkpoint, sidecar_path, write_json_atomic
from .bn_reestimation import reestimate_bn_statistics
from .bn_reestimation_data import qat_training_hyperparameters, seeded_random_state, shuffled_image_batches, training_dataset
from .calibration import select_heldout_set
from .evaluate import evaluate_model, evaluation_settings, resolve_device
from .models import build_detection_model
from .qat import quant_options
from .qc import QCConfig, run_qc
from .quantize import freeze_quantized_weights, quantize_w4a16
from .requests import QCRequest

CHECKPOINT_NAME = "qc_checkpoint.pt"


def run_qc_stage(request: QCRequest, log: Callable[[str], None]) -> dict:
    settings = request.settings
    device = resolve_device(settings.device)
    label = f"{request.variant} {request.method}|{request.seed}"
    started = time.time()
    qat = read_sidecar(request.qat_checkpoint)
    checkpoint = request.out_dir / CHECKPOINT_NAME
    if qat.get("diverged_at_epoch"):
        reason = f"QAT diverged at epoch {qat['diverged_at_epoch']}; there is no finished model to correct"
        log(f"{label}: QC skipped: {reason}")
        write_json_atomic(sidecar_path(checkpoint), {"skipped": reason, "variant": request.variant, "qat_sha256": request.qat_sha256})
        return {"skipped": reason}

    model = build_detection_model(request.variant, qat["names"])
    quantize_w4a16(model, quant_options(settings))
    # QC starts from the EMA weights: the copy the paper evaluates (for `baseline` it equals the live model).
    model.load_state_dict(load_checkpoint(request.qat_checkpoint, request.qat_sha256)["ema"])
    model.to(device).eval()

    def evaluate(which):
        return evaluate_model(
            freeze_quantized_weights(which), request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch,
            device=device, workers=settings.workers, work_dir=request.out_dir / "eval",
        )

    before = qat_final_evaluation(qat, settings)
    if before is None:
        before = evaluate(model)
        log(f"{label}: before QC mAP50-95 {before['map50_95']:.4f}")
    else:
        log(f"{label}: before QC mAP50-95 {before['map50_95']:.4f} (QAT's last evaluation of these EMA weights)")
    bn = run_bn_reestimation(model, before, request, device, evaluate, lambda m: log(f"{label}: {m}"))
    config = QCConfig(
        batch=settings.qc_batch, imgsz=settings.imgsz, device=device, epochs=settings.qc_epochs, lr=settings.qc_lr,
        workers=settings.workers, optimizer=settings.qc_optimizer, seed=request.seed,
    )
    heldout = select_heldout_set(
        request.dataset_yaml, request.calibration_yaml, request.out_dir / "heldout",
        size=settings.calibration_images,
    )
    model, report = run_qc(model, str(request.calibration_yaml), config, log=lambda m: log(f"{label}: {m}"),
                           check_yaml=str(heldout) if heldout else None)
    # A rejected QC returns the model it was given: its evaluation is the one before.
    after = before if report["rejected"] else evaluate(model)
    delta = after["map50_95"] - before["map50_95"]
    log(f"{label}: after QC mAP50-95 {after['map50_95']:.4f} ({delta:+.4f})")
    sidecar = {
        "variant": request.variant, "method": request.method, "seed": request.seed, "names": qat["names"],
        "map50_95_before": before["map50_95"], "map50_95_after": after["map50_95"],
        "map50_before": before["map50"], "map50_after": after["map50"], "delta": delta,
        "max_fold_rel_diff": report["fold_max_relative_difference"],
        "fold_check_precision": report["fold_check_precision"], "fixed_gamma_layers": report["fixed_gamma_layers"],
        "qc_settings": {
            "epochs": config.epochs, "lr": config.lr, "batch": config.batch, "optimizer": config.optimizer,
            "calibration_images": report["images"] // max(config.epochs, 1), "steps": report["steps"],
            "loss_before": report["loss_before"], "loss_after": report["loss_after"],
            **{key: report[key] for key in ("check_set", "check_images", "check_loss_before", "check_loss_after")},
            "rejected": report["rejected"],
            "calibration_fingerprint": request.calibration_fingerprint,
        },
        "bn_reestimation": bn,
        "layer_stats": report["corrections"], "evaluation": evaluation_settings(settings.imgsz, settings.batch),
        "qat_sha256": request.qat_sha256, "settings": settings.model_dump(mode="json"), "device": device,
        "seconds": time.time() - started,
    }
    digest = save_checkpoint(checkpoint, {"model": model.float().state_dict()}, sidecar)
    return {"checkpoint": str(checkpoint), "sha256": digest, **sidecar}


def qat_final_evaluation(qat: dict, settings) -> dict | None:
    """QAT's evaluation of its final EMA weights, when it is the one QC's "before" evaluation would repeat.

    The last history record of a completed QAT run evaluated exactly the EMA weights QC starts from, with
    the same validator settings on the same val split (both stages get the subset's dataset YAML). Measured
    on the 8 QC runs of an embedded ladder: QC's own "before" evaluation equalled it in all the digits the
    history keeps (5, Ultralytics rounds in-training metrics), so re-running it costs a full evaluation for
    nothing. None when the settings or the run differ (e.g. a QAT run that stopped early, or one whose batch
    Ultralytics halved after an OOM: its validations ran at the halved batch), and for a QAT run on a GPU:
    both evaluations are fp32, but TF32 convolutions round the in-training (unfused) model and the standalone
    (Conv+BN fused) one differently, unmeasured here, so QC's delta is taken from two evaluations alike.
    """
    history = [h for h in qat.get("history", []) if h.get("epoch", 0) > 0]
    if (not history or qat.get("device") != "cpu"
            or qat.get("evaluation") != evaluation_settings(settings.imgsz, settings.batch)
            or history[-1]["epoch"] != qat.get("planned_epochs") or qat.get("diverged_at_epoch")
            or history[-1].get("map50_95") is None or qat.get("training_batch", {}).get("halved")):  # QAT always validates its last epoch (qat_val_interval)
        return None
    return {key: float(history[-1][key]) for key in ("map50_95", "map50", "precision", "recall")}


def run_bn_reestimation(
    model: nn.Module, before: dict, request: QCRequest, device: str, evaluate: Callable[[nn.Module], dict],
    log: Callable[[str], None],
) -> dict:
    """Re-estimate BN statistics of a frozen copy on the QAT run's training pipeline (core/bn_reestimation_data.py); evaluate it."""
    settings = request.settings
    frozen = freeze_quantized_weights(model)
    hyperparameters = qat_training_hyperparameters(settings, request.variant, request.dataset_yaml, device, request.seed)
    dataset = training_dataset(hyperparameters, request.dataset_yaml, frozen)
    with seeded_random_state(request.seed):
        images = shuffled_image_batches(dataset, settings.batch, settings.workers, device, seed=request.seed)
        report = reestimate_bn_statistics(frozen, images, settings.bn_reestimation_batches, log=log)
    after = evaluate(frozen)
    delta = after["map50_95"] - before["map50_95"]
    log(f"after BN re-estimation mAP50-95 {after['map50_95']:.4f} ({delta:+.4f})")
    return {
        "map50_95_before": before["map50_95"], "map50_95_after": after["map50_95"],
        "map50_before": before["map50"], "map50_after": after["map50"], "delta": delta,
        "batches": report["batches"], "images": report["images"], "seconds": report["seconds"],
        "data": "training pipeline (mode train, QAT augmentation, shuffled)",
    }
