"""The W4A16 QAT stage: one (variant, method, seed) run from the FP checkpoint to `qat_checkpoint.pt`.

Both methods of a seed share one training, the seed's trajectory. The EMA copy never feeds back into
training, so an `ema` run's live weights are the `baseline` run's, bit for bit: trained separately, the
four baseline/ema pairs of the embedded ladder ended with identical state dicts. The trajectory therefore
runs with the EMA method's averaging and validates, after every epoch, both the EMA copy (the `ema`
method's history) and the live weights (the `baseline` method's, which is what EMA decay 0 evaluated).
Whichever of the two partitions runs first trains it; the other waits on its lock and reuses it. Each
then writes its own checkpoint: `model` the live weights, `ema` the weights its method evaluates.

At the end, still under the lock, the final EMA copy and live weights are compared by a paired bootstrap over
val images (core/within_seed.py: the seed's within-seed uncertainty), from the per-image statistics of the
last epoch's own validations; the second run reads the stored result, so both sidecars carry the same one.

Epoch 0 of the history is the freshly quantized pretrained model (PTQ), evaluated before any training.
A long run can validate every `qat_val_interval` epochs and then every epoch of its last
`qat_val_final_epochs` (`validated_qat_epochs`); an epoch without a validation is in the history with
metrics, live metrics and diagnostics None. The cadence changes no trained weight (validation restores
the random state training draws from), so it is not part of the trajectory's fingerprint: a trajectory
keeps the validations it was trained with, and a resumed one validates at the current cadence.
The trajectory resumes from its last completed epoch when re-run after a crash, and a NaN/Inf stops it as
diverged: the checkpoints it has are kept and the result says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Callable

from ultralytics.utils.torch_utils import unwrap_model

from .artifacts import exclusive_lock, save_checkpoint, write_json_atomic
from .bn_reestimated_validation import BNReestimatedValidation
from .diagnostics import CollapseDiagnostics
from .evaluate import evaluate_model, evaluation_settings, resolve_device
from .models import load_float_model
from .oscillation import OscillationTracker
from .pretrain import describe_epoch
from .quantize import QuantOptions, freeze_quantized_weights, quantize_w4a16
from .requests import QATRequest
from .settings import QAT_FIELDS, Settings
from .trainer import (
    HISTORY_FILE, ResumableTrainer, ScaleTraining, TrainingDiverged, ema_schedule, load_resume_state, resolve_precision,
    trainer_overrides, training_batch,
)
from .validation_cadence import validated_qat_epochs
from .within_seed import keep_final_images, within_seed_uncertainty

CHECKPOINT_NAME = "qat_checkpoint.pt"
DIVERGED_FILE = "diverged.json"  # in the trajectory: the epoch and reason it diverged


def quant_options(settings: Settings) -> QuantOptions:
    return QuantOptions(
        weight_bit_width=settings.weight_bit_width,
        keep_first_last_8bit=settings.keep_first_last_8bit,
        learned_scales=settings.learned_scales,
        per_channel_scales=settings.per_channel_scales,
    )


def trajectory_fingerprint(request: QATRequest) -> str:
    """What a saved trajectory must match to be resumed or reused: same inputs, settings and seed (any method), and
    the precision `amp` resolves to on this step's device (`auto` is bf16 on a GPU and fp32 on the CPU)."""
    settings = request.settings
    precision = resolve_precision(settings.amp, resolve_device(settings.device))
    parts = (
        request.pretrained_sha256, request.dataset_fingerprint, settings.fingerprint_of(QAT_FIELDS), str(request.seed),
        # fp32 adds nothing, so trajectories trained before the amp setting existed (all fp32) are still reused
        *([precision] if precision != "off" else []),
        # likewise the settings added later, at the values runs had before them
        *([json.dumps(added, sort_keys=True)] if (added := settings.added_training_fields()) else []),
    )
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def method_history(trajectory_history: list[dict], method: str) -> list[dict]:
    """One method's view of the trajectory's history: `ema` the EMA copy's metrics, `baseline` the live weights'."""
    view = []
    for record in trajectory_history:
        record = dict(record)
        live = record.pop("live", None)
        if method == "baseline" and live is not None:
            record.update(live)
        if record.get("bn_reestimated"):  # the +BN metrics of the weights this method evaluates
            record["bn_reestimated"] = record["bn_reestimated"]["live" if method == "baseline" else "ema"]
        view.append(record)
    return view


def run_qat(request: QATRequest, log: Callable[[str], None]) -> dict:
    settings = request.settings
    started = time.time()
    label = f"{request.variant} {request.method}|{request.seed}"
    model, pretrained = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    # YOLOv10's NMS-free (one-to-one) head, which QAT trains beside the one-to-many head every metric uses:
    # the FP stage's figure and the final weights', so a user sees whether W4 hurts it more. An FP checkpoint
    # written before the FP stage measured it, or measured on other val images or settings, is measured here.
    recorded = pretrained.get("one_to_one_metrics")
    same_val = (pretrained.get("dataset_fingerprint") == request.dataset_fingerprint
                and pretrained.get("evaluation") == evaluation_settings(settings.imgsz, settings.batch))
    fp_one_to_one = recorded if recorded and same_val else one_to_one_metrics(model, request)
    report = quantize_w4a16(model, quant_options(settings))
    log(f"{label}: quantized {report.counts()} (W{settings.weight_bit_width}A16, "
        f"{'per-output-channel' if settings.per_channel_scales else 'per-tensor'} scales)")
    batches_per_epoch = -(-request.train_images // settings.batch)
    ema_of = {
        method: ema_schedule(
            settings.ema_decay if method == "ema" else 0.0, settings.ema_tau, settings.qat_epochs * batches_per_epoch,
            batches_per_epoch,
        )
        for method in ("baseline", "ema")
    }

    def report_wait() -> None:
        log(f"{label}: waiting for seed {request.seed}'s QAT trajectory ({request.trajectory_dir}): the other "
            f"method's run is training it, and this run reuses it when it is done")

    waiting_since = time.time()
    with exclusive_lock(request.trajectory_dir / "lock", on_wait=report_wait):
        waited = time.time() - waiting_since
        history, final_state, diverged_at, resume_note = train_trajectory(request, model, ema_of["ema"], log)
        within_seed = final_within_seed(request, model, history, final_state, diverged_at, log)

    history = method_history(history, request.method)
    batch = training_batch(history, settings.batch)
    if batch["halved"]:
        log(f"{label}: Ultralytics halved the batch after running out of memory: trained at {batch['used']}, not the "
            f"configured {settings.batch}; this run is NOT comparable with runs at batch {settings.batch}")
    log(f"{label}: PTQ (epoch 0) mAP50-95 {history[0]['map50_95']:.4f} vs FP {pretrained['metrics']['map50_95']:.4f}; "
        f"evaluates the {'EMA copy' if request.method == 'ema' else 'live weights'} of the trajectory")
    trained = [h for h in history if h["epoch"] > 0]
    validated = [h for h in trained if h["map50_95"] is not None]
    sidecar = {
        "variant": request.variant, "method": request.method, "seed": request.seed,
        "names": pretrained["names"], "planned_epochs": settings.qat_epochs, "completed_epochs": len(trained),
        "validated_epochs": [h["epoch"] for h in validated],
        "diverged_at_epoch": diverged_at, "resume": resume_note, "history": history,
        "ptq_map50_95": history[0]["map50_95"], "fp_map50_95": pretrained["metrics"]["map50_95"],
        "quantization": report.to_dict(), "quantization_counts": report.counts(), "ema": ema_of[request.method],
        "trajectory": {
            "dir": str(request.trajectory_dir), "fingerprint": trajectory_fingerprint(request),
            "waited_seconds": waited,  # for the other method's run to finish training it
        },
        "evaluation": evaluation_settings(settings.imgsz, settings.batch),
        "training_batch": batch,
        "dataset_fingerprint": request.dataset_fingerprint, "pretrained_sha256": request.pretrained_sha256,
        "profile_fingerprint": settings.training_profile_fingerprint(), "settings": settings.model_dump(mode="json"),
        "device": resolve_device(settings.device), "seconds": time.time() - started,
        "training_precision": resolve_precision(settings.amp, resolve_device(settings.device)),  # in the fingerprint
    }
    evaluated = final_state["ema"] if request.method == "ema" else final_state["model"]
    if trained:
        final_one_to_one = {"epoch": trained[-1]["epoch"],
                            **one_to_one_metrics(freeze_quantized_weights(with_weights(model, evaluated)), request)}
        # A diverged run's last completed epoch may not have been validated: the one-to-many figure is then its
        # last validated epoch's.
        one_to_many = (f"epoch {validated[-1]['epoch']} {validated[-1]['map50_95']:.4f}" if validated else "not validated")
        log(f"{label}: NMS-free (one-to-one) head mAP50-95 FP {fp_one_to_one['map50_95']:.4f} -> epoch "
            f"{trained[-1]['epoch']} {final_one_to_one['map50_95']:.4f} (one-to-many head FP "
            f"{pretrained['metrics']['map50_95']:.4f} -> {one_to_many})")
    sidecar["one_to_one"] = {"fp": fp_one_to_one, "final": final_one_to_one if trained else None}
    sidecar["within_seed"] = within_seed.model_dump() if within_seed is not None else None
    checkpoint = request.out_dir / CHECKPOINT_NAME
    digest = save_checkpoint(checkpoint, {"model": final_state["model"], "ema": evaluated}, sidecar)
    return {"checkpoint": str(checkpoint), "sha256": digest, **sidecar}


def final_within_seed(request: QATRequest, model, history: list[dict], final_state: dict, diverged_at: int | None,
                      log: Callable[[str], None]):
    """EMA − live of the trajectory's final weights with its val-image interval; None for a diverged trajectory."""
    label = f"{request.variant} {request.method}|{request.seed}"
    if diverged_at is not None:
        log(f"{label}: no within-seed bootstrap: the trajectory diverged in epoch {diverged_at}")
        return None
    settings = request.settings

    def evaluate(which: str) -> list:
        final = with_weights(model, final_state["ema" if which == "ema" else "model"])
        images: list = []
        evaluate_model(freeze_quantized_weights(final), request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch,
                       device=resolve_device(settings.device), workers=settings.workers,
                       work_dir=request.trajectory_dir / "eval", per_image=images)
        return images

    result = within_seed_uncertainty(
        request.trajectory_dir, trajectory_fingerprint(request), history[-1]["epoch"],
        resamples=settings.within_seed_resamples, seed=request.seed, evaluate=evaluate, log=lambda line: log(f"{label}: {line}"),
    )
    log(f"{label}: within seed {request.seed}, EMA - live mAP50-95 at epoch {result.epoch}: {result.difference:+.4f}, "
        f"95 % interval over val images {result.ci_low:+.4f} to {result.ci_high:+.4f} (paired bootstrap, "
        f"{result.images} images x {result.resamples} resamples, seed {result.seed}; std {result.std:.4f}, unpaired "
        f"{result.unpaired_std:.4f}; statistics: {result.source})")
    return result


def with_weights(model, state: dict):
    """A copy of the quantized `model` holding `state` (the trajectory trains `model` in place)."""
    copied = copy.deepcopy(model)
    copied.load_state_dict(state)
    return copied


def one_to_one_metrics(model, request: QATRequest) -> dict[str, float]:
    """mAP of YOLOv10's one-to-one head alone (Ultralytics' `nms=False`), on the val set every epoch uses."""
    settings = request.settings
    return evaluate_model(
        model, request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch, device=resolve_device(settings.device),
        workers=settings.workers, work_dir=request.out_dir / "eval_one_to_one", nms=False,
    )


def train_trajectory(
    request: QATRequest, model, ema: dict, log: Callable[[str], None]
) -> tuple[list[dict], dict, int | None, str]:
    """Train (or resume, or reuse) the seed's trajectory: its history, final {model, ema} state, divergence epoch, resume note."""
    settings = request.settings
    device = resolve_device(settings.device)
    label = f"{request.variant} {request.method}|{request.seed}"
    run_dir = request.trajectory_dir
    fingerprint = trajectory_fingerprint(request)
    epochs = settings.qat_epochs
    state, history, resume_note = load_resume_state(run_dir, fingerprint, epochs)
    log(f"{label}: seed {request.seed}'s QAT trajectory (both methods): {resume_note}")
    if not history:
        ptq = evaluate_model(
            freeze_quantized_weights(model), request.dataset_yaml, imgsz=settings.imgsz, batch=settings.batch,
            device=device, workers=settings.workers, work_dir=run_dir / "eval",
        )
        history = [{"epoch": 0, **ptq}]
        write_json_atomic(run_dir / HISTORY_FILE, history)

    oscillation = OscillationTracker(settings.oscillation_momentum, settings.oscillation_threshold)
    if state is not None and "oscillation" in state:
        oscillation.load_state_dict(state["oscillation"])

    diagnostics = CollapseDiagnostics(oscillation, batch_images=settings.batch, seed=request.seed)
    other = "baseline" if request.method == "ema" else "ema"

    def describe(record: dict) -> str:
        """The epoch as this run's method sees it, with the other method's mAP from the same training."""
        other_map = method_history([record], other)[0]["map50_95"]
        return (f"{label} {describe_epoch(method_history([record], request.method)[0])}, {other} mAP50-95 "
                f"{'not validated' if other_map is None else f'{other_map:.4f}'}, oscillating {record['oscillating_fraction']:.4f}")

    # A divergence is the trajectory's result, for both methods: the other method's run must not resume past it.
    marker = run_dir / DIVERGED_FILE
    diverged = json.loads(marker.read_text()) if marker.is_file() else {}
    diverged_at = diverged.get("epoch") if diverged.get("fingerprint") == fingerprint else None
    if diverged_at is not None:
        log(f"{label}: the trajectory DIVERGED in epoch {diverged_at} when it was trained ({diverged['reason']}); "
            f"reusing that result (delete {run_dir} to train it again)")
    final_state = state
    ptq_start = {k: v.detach().clone() for k, v in model.state_dict().items()}  # training updates `model` in place
    if diverged_at is None and (state is None or int(state["epoch"]) < epochs):
        trainer = ResumableTrainer(
            model=model,
            overrides={
                **trainer_overrides(settings, request.variant, request.dataset_yaml, run_dir, device, epochs, request.seed),
                "optimizer": settings.qat_optimizer, "lr0": settings.qat_lr, "lrf": settings.qat_lrf,
                "warmup_epochs": settings.qat_warmup_epochs, "weight_decay": settings.qat_weight_decay,
                # One optimizer step per batch, so even short runs give the EMA enough updates to average.
                "nbs": settings.batch,
            },
            run_dir=run_dir,
            precision=resolve_precision(settings.amp, device),
            ema=ema,
            on_epoch=lambda record: log(describe(record)),
            state_fingerprint=fingerprint,
            resume_state=state,
            history=history,
            validation_model=freeze_quantized_weights,
            validate_live=True,
            validate_epoch=validated_qat_epochs(epochs, settings.qat_val_interval, settings.qat_val_final_epochs),
            after_optimizer_step=oscillation.update_model,
            scale_training=ScaleTraining(settings.scale_optimizer, settings.scale_lr) if settings.lsq_scales else None,
            record_per_image=True,  # the last epoch's give the within-seed bootstrap (core/within_seed.py)
            epoch_diagnostics=lambda trainer: diagnostics.measure(unwrap_model(trainer.model), trainer.train_loader.dataset),
            extra_state=lambda: {
                "epoch_fields": {
                    "oscillating_fraction": oscillation.oscillating_fraction(), **(bn_curve.epoch_fields() if bn_curve else {}),
                },
                "tensors": {"oscillation": oscillation.state_dict()},
            },
        )
        bn_curve = (BNReestimatedValidation(trainer, settings.bn_reestimation_batches, request.seed)
                    if settings.bn_reestimate_every_eval else None)
        try:
            trainer.train()
        except TrainingDiverged as exc:
            diverged_at = exc.epoch
            write_json_atomic(marker, {"epoch": exc.epoch, "reason": str(exc), "fingerprint": fingerprint})
            log(f"{label}: DIVERGED — {exc}; keeping the checkpoints of the {len(trainer.history) - 1} finished epochs")
        history = trainer.history
        final_state = {"model": trainer.model.state_dict(), "ema": trainer.ema.ema.state_dict()}
        if diverged_at is None and trainer.per_image_epoch == history[-1]["epoch"]:
            keep_final_images(run_dir, fingerprint, trainer.per_image_epoch, trainer.per_image)
    if diverged_at is not None:  # the last completed epoch, or the PTQ start if none completed
        final_state, _, _ = load_resume_state(run_dir, fingerprint, epochs)
        final_state = final_state or {"model": ptq_start, "ema": ptq_start}
    return history, final_state, diverged_at, resume_note
