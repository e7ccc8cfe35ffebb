"""The W4A16 QAT stage: one (variant, method, seed) run from the FP checkpoint to `qat_checkpoint.pt`.

Epoch 0 of the history is the freshly quantized pretrained model (PTQ), evaluated before any training.
The run resumes from its last completed epoch when re-run after a crash, and a NaN/Inf stops it as
diverged: the checkpoints it has are kept and the result says so.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from .artifacts import save_checkpoint, write_json_atomic
from .evaluate import evaluate_model, evaluation_settings, resolve_device
from .models import load_float_model
from .oscillation import OscillationTracker
from .pretrain import describe_epoch
from .quantize import QuantOptions, freeze_quantized_weights, quantize_w4a16
from .requests import QATRequest
from .settings import QAT_FIELDS, Settings
from .trainer import HISTORY_FILE, ResumableTrainer, TrainingDiverged, ema_schedule, load_resume_state, trainer_overrides

CHECKPOINT_NAME = "qat_checkpoint.pt"


def quant_options(settings: Settings) -> QuantOptions:
    return QuantOptions(
        weight_bit_width=settings.weight_bit_width,
        keep_first_last_8bit=settings.keep_first_last_8bit,
        learned_scales=settings.learned_scales,
        per_channel_scales=settings.per_channel_scales,
    )


def run_fingerprint(request: QATRequest) -> str:
    """What a saved training state must match to be resumed: same inputs, settings, method and seed."""
    parts = (
        request.pretrained_sha256, request.dataset_fingerprint, request.settings.fingerprint_of(QAT_FIELDS),
        request.method, str(request.seed),
    )
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_qat(request: QATRequest, log: Callable[[str], None]) -> dict:
    settings = request.settings
    device = resolve_device(settings.device)
    started = time.time()
    label = f"{request.variant} {request.method}|{request.seed}"
    run_dir = request.out_dir / "run"
    model, pretrained = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    report = quantize_w4a16(model, quant_options(settings))
    log(f"{label}: quantized {report.counts()} (W{settings.weight_bit_width}A16, "
        f"{'per-output-channel' if settings.per_channel_scales else 'per-tensor'} scales)")

    fingerprint = run_fingerprint(request)
    epochs = settings.qat_epochs
    state, history, resume_note = load_resume_state(run_dir, fingerprint, epochs)
    log(f"{label}: {resume_note}")
    if not history:
        ptq = evaluate_model(
            freeze_quantized_weights(model), request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch,
            device=device, work_dir=request.out_dir / "eval",
        )
        history = [{"epoch": 0, **ptq}]
        write_json_atomic(run_dir / HISTORY_FILE, history)
        log(f"{label}: PTQ (epoch 0) mAP50-95 {ptq['map50_95']:.4f} vs FP {pretrained['metrics']['map50_95']:.4f}")

    batches_per_epoch = -(-request.train_images // settings.batch)
    ema = ema_schedule(
        settings.ema_decay if request.method == "ema" else 0.0, settings.ema_tau, epochs * batches_per_epoch,
        batches_per_epoch,
    )
    oscillation = OscillationTracker(settings.oscillation_momentum, settings.oscillation_threshold)
    if state is not None and "oscillation" in state:
        oscillation.load_state_dict(state["oscillation"])

    diverged_at = None
    final_state = state
    ptq_start = {k: v.detach().clone() for k, v in model.state_dict().items()}  # training updates `model` in place
    if state is None or int(state["epoch"]) < epochs:
        trainer = ResumableTrainer(
            model=model,
            overrides={
                **trainer_overrides(settings, request.variant, request.dataset_yaml, run_dir, device, epochs, request.seed),
                "optimizer": settings.qat_optimizer, "lr0": settings.qat_lr, "lrf": settings.qat_lrf,
                "warmup_epochs": settings.qat_warmup_epochs,
                # One optimizer step per batch, so even short runs give the EMA enough updates to average.
                "nbs": settings.batch,
            },
            run_dir=run_dir,
            ema=ema,
            on_epoch=lambda record: log(f"{label} {describe_epoch(record)}, oscillating {record['oscillating_fraction']:.4f}"),
            state_fingerprint=fingerprint,
            resume_state=state,
            history=history,
            validation_model=freeze_quantized_weights,
            after_optimizer_step=oscillation.update_model,
            extra_state=lambda: {
                "epoch_fields": {"oscillating_fraction": oscillation.oscillating_fraction()},
                "tensors": {"oscillation": oscillation.state_dict()},
            },
        )
        try:
            trainer.train()
        except TrainingDiverged as exc:
            diverged_at = exc.epoch
            log(f"{label}: DIVERGED — {exc}; keeping the checkpoints of the {len(trainer.history) - 1} finished epochs")
        history = trainer.history
        final_state = {"model": trainer.model.state_dict(), "ema": trainer.ema.ema.state_dict()} if diverged_at is None else None
    if final_state is None:  # diverged: the last completed epoch, or the PTQ start if none completed
        final_state, _, _ = load_resume_state(run_dir, fingerprint, epochs)
        final_state = final_state or {"model": ptq_start, "ema": ptq_start}

    trained = [h for h in history if h["epoch"] > 0]
    sidecar = {
        "variant": request.variant, "method": request.method, "seed": request.seed,
        "names": pretrained["names"], "planned_epochs": epochs, "completed_epochs": len(trained),
        "diverged_at_epoch": diverged_at, "resume": resume_note, "history": history,
        "ptq_map50_95": history[0]["map50_95"], "fp_map50_95": pretrained["metrics"]["map50_95"],
        "quantization": report.to_dict(), "quantization_counts": report.counts(), "ema": ema, "evaluation": evaluation_settings(settings.imgsz, settings.batch),
        "dataset_fingerprint": request.dataset_fingerprint, "pretrained_sha256": request.pretrained_sha256,
        "profile_fingerprint": settings.training_profile_fingerprint(), "settings": settings.model_dump(mode="json"),
        "device": device, "seconds": time.time() - started,
    }
    checkpoint = request.out_dir / CHECKPOINT_NAME
    digest = save_checkpoint(checkpoint, {"model": final_state["model"], "ema": final_state["ema"]}, sidecar)
    return {"checkpoint": str(checkpoint), "sha256": digest, **sidecar}
