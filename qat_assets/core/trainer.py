"""Ultralytics' DetectionTrainer, extended (not copied) for resumable, observable runs.

What the subclass changes, and why:
- checkpoints are state dicts (Brevitas quantizers do not pickle), written atomically every epoch
  together with the optimizer, EMA and history, so a killed worker resumes at the last full epoch;
- the EMA decay and ramp come from our settings (decay 0 for the baseline: the validated copy is then
  exactly the live model);
- validation can run on a frozen copy of the EMA model (quantized weights computed once, not on every
  forward), and can validate the live weights as well (`validate_live`): the EMA never feeds back into
  training, so one run then gives both the EMA method's history and the no-EMA baseline's;
- a NaN/Inf loss, gradient or fitness stops the run as diverged instead of Ultralytics' reload-from-last.pt,
  found with one host sync per optimizer step (core/divergence.py);
- learned quantizer scales get no weight decay; with `scale_training` (LSQ) they get LSQ's gradient scale
  and their own optimizer and LR;
- validation leaves the random state as it found it: Ultralytics' validation transforms draw from Python's
  `random`, which the training augmentations also draw from, so without this the trained weights would
  depend on how often the run validated;
- `validate_epoch` can skip validations (an FP run needs its plateau window, not every epoch; a long QAT run
  its final window); a skipped epoch is recorded with no metrics (None) rather than with the last validated
  epoch's, and each validated one with the seconds its validation took;
- `epoch_diagnostics(trainer)` runs after each validation and its result is the epoch record's
  `diagnostics` (core/diagnostics.py: why a run collapses);
- with `record_per_image`, each validation keeps every val image's matching statistics of the EMA copy and
  of the live weights (`per_image`, `per_image_epoch`): the last epoch's give the within-seed bootstrap of
  EMA − live (core/within_seed.py) without validating the final weights again;
- each finished epoch is reported through `on_epoch` as a plain dict, with the batch it trained at: Ultralytics
  halves the batch when the first epoch of a run runs out of GPU memory, and says so only in its log
  (`training_batch` turns that into the sidecars' record and comparison's verdict);
- the linear LR decay can end `lr_hold_epochs` before the run, which then holds the final LR (a run whose
  LR falls until its last epoch keeps gaining from the annealing alone, so it never shows a plateau);
- mixed precision (`precision`, from the `amp` setting) is switched on after Ultralytics' setup, which runs
  with its own `amp` off: with it on, Ultralytics' fp16 setup downloads yolo26n.pt for `check_amp` (a worker
  is offline) and its bf16 branch refuses the CPU; the training loop reads only `amp`, `args.amp` and `scaler`;
- validation is fp32 under AMP too (`FP32TrainingValidator`), like every standalone evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

from .artifacts import atomic_path, on_cpu, write_json_atomic
from .divergence import DivergenceWatch
from .evaluate import metrics_from_ultralytics
from .image_bootstrap import ImageStats, recording_per_image
from .models import variant_yaml
from .quantize import LearnedScale, learned_scales, scale_lsq_gradients
from .settings import Settings

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
Precision = Literal["off", "bf16", "fp16"]


class TrainingDiverged(RuntimeError):
    """The loss or the validation fitness became NaN/Inf."""

    def __init__(self, epoch: int, what: str):
        super().__init__(f"{what} became NaN/Inf in epoch {epoch}")
        self.epoch = epoch


def ema_schedule(
    decay: float, tau: float | None, total_updates: int, updates_per_epoch: int, window_fraction: float = 0.05
) -> dict:
    """EMA decay and ramp constant actually used for a run of `total_updates` optimizer steps.

    The paper's a=0.9999 averages over ~10k steps, about 5% of a 100-epoch COCO run, after Ultralytics'
    ramp of tau=2000 steps. A 32-step CPU run with the same decay would never move its EMA copy off the
    starting weights, so the averaging window 1/(1-decay) is capped at `window_fraction` of the run, but
    never below one epoch of updates (so short runs still average); tau, unless given, is a fifth of
    the window, at most Ultralytics' 2000. At the coco profile this gives back 0.9999 and 2000.
    """
    if decay == 0:
        return {"decay": 0.0, "tau": 1.0, "configured_decay": 0.0, "configured_tau": tau, "total_updates": total_updates}
    window = max(window_fraction * total_updates, updates_per_epoch, 1.0)
    used_decay = min(decay, 1.0 - 1.0 / window) if window > 1 else 0.0
    used_tau = tau if tau is not None else min(max(window / 5.0, 1.0), 2000.0)
    return {
        "decay": used_decay, "tau": used_tau, "configured_decay": decay, "configured_tau": tau,
        "total_updates": total_updates,
    }


def linear_decay_then_hold(epochs: int, lrf: float, hold_epochs: int) -> Callable[[int], float]:
    """LR factor of epoch x: Ultralytics' linear 1 -> lrf, over the first epochs - hold_epochs, then lrf."""
    decay_epochs = epochs - hold_epochs
    return lambda x: max(1 - x / decay_epochs, 0) * (1.0 - lrf) + lrf


def gradients_to_check(parameters: Iterable[torch.nn.Parameter], scaler: torch.amp.GradScaler) -> list[torch.Tensor]:
    """The gradients whose NaN/Inf counts as divergence: none under AMP's GradScaler, where a non-finite scaled
    gradient is its signal to skip that step and lower its scale (routine in the first steps), and a diverged
    run still shows as a non-finite loss."""
    if scaler.is_enabled():
        return []
    return [p.grad for p in parameters if p.grad is not None]


@contextlib.contextmanager
def preserved_random_state():
    """Python's, NumPy's and torch's random state (CUDA's too, once initialised) restored on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def resolve_precision(amp: str, device: str) -> Precision:
    """The training precision the `amp` setting gives on `device` (resolved: `cpu`, `cuda:0`, ...).

    `auto` is bf16 on a CUDA GPU with native bf16 (compute capability 8 and up: Ampere, Hopper, ...) and off
    everywhere else. bf16 has fp32's exponent range, so it needs no GradScaler (whose separate unscaling would
    not reach LSQ's own scale optimizer), and its tensor-core rate is twice TF32's, which cuDNN convolutions
    already use by default there. On older GPUs fp16 is the fast choice but needs a GradScaler: asked for, not
    picked. On the CPU, bf16 is PyTorch's CPU autocast, which the tests use to run the GPU path's mixed precision;
    `auto` leaves the CPU in fp32, so CPU results do not depend on whether the CPU has native bf16 kernels.
    """
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"QAT_AMP={amp!r} is not one of auto, off, bf16, fp16")
    kind = device.split(":")[0]
    if amp == "auto":
        return "bf16" if kind == "cuda" and _native_bf16(device) else "off"
    if amp == "fp16" and kind != "cuda":
        raise ValueError(f"QAT_AMP=fp16 needs a CUDA device (its GradScaler), not {device!r}: use bf16, auto or off")
    if amp == "bf16" and kind not in ("cuda", "cpu"):
        raise ValueError(f"QAT_AMP=bf16 runs on CUDA or the CPU, not on {device!r}: use off")
    if amp == "bf16" and kind == "cuda" and not _native_bf16(device):
        raise ValueError(f"QAT_AMP=bf16: {device} has no native bf16 (before Ampere); use fp16 or off")
    return amp


def _native_bf16(device: str) -> bool:
    # Ultralytics' bf16 autocast refuses emulated bf16 (`including_emulation=False`), and so do we.
    with torch.cuda.device(torch.device(device)):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def trainer_overrides(
    settings: Settings, variant: str, data_yaml: Path, run_dir: Path, device: str, epochs: int, seed: int
) -> dict:
    """Ultralytics arguments shared by FP pretraining and QAT.

    Ultralytics' own `amp` stays off: ResumableTrainer switches the `amp` setting's precision on after setup.
    """
    return dict(
        model=variant_yaml(variant),  # recorded in args only: the trainer is handed a built module
        data=str(data_yaml), epochs=epochs, imgsz=settings.imgsz, batch=settings.batch,
        workers=settings.workers, device=device, seed=seed, deterministic=True, amp=False, plots=False,
        verbose=False, project=str(run_dir), name="ultralytics", exist_ok=True,
        # No early stopping: the planned epochs are the protocol, and a run that peaks early then collapses (the
        # failure studied) would be cut 100 epochs after its peak (Ultralytics' default patience) as "incomplete".
        patience=0,
    )


def training_batch(history: list[dict[str, Any]], configured: int) -> dict[str, Any]:
    """The batch a run trained at, against the configured one.

    Ultralytics 8.4 (`BaseTrainer._do_train`) catches an out-of-memory error in the first epoch of a run (of a
    resumed one too), halves `batch` up to 3 times, rebuilds the loaders and restarts the epoch; the rest of the
    run trains at the halved batch, with gradients accumulated to the same nominal batch (nbs) but BatchNorm
    statistics, augmentation draws and the validation batch of the smaller one. `used` lists every batch the
    trained epochs ran at (a resumed run can halve again, or not); `halved` is true when any differs from
    `configured`, and such a run is not comparable with runs at the configured batch (core/comparison.py).
    Histories written before the batch was recorded count as the configured batch."""
    used = sorted({int(h.get("batch") or configured) for h in history if h["epoch"] > 0}) or [configured]
    return {"configured": configured, "used": used, "halved": used != [configured]}


@dataclass(frozen=True)
class ScaleTraining:
    """Learned scales as LSQ trains them: their gradient scaled by 1/sqrt(N * Q_p), and their own optimizer and
    LR (the reference, Qualcomm's oscillations-qat, uses Adam at 1e-5), following the weights' LR schedule."""

    optimizer: Literal["Adam", "SGD"]
    lr: float


def separate_scale_optimizer(
    optimizer: torch.optim.Optimizer, scales: list[LearnedScale], training: ScaleTraining
) -> torch.optim.Optimizer:
    """Move `scales` out of `optimizer`'s groups into an optimizer of their own, stepped (and zeroed) right after
    every step of `optimizer`, so Ultralytics' step, clipping included, drives both. No weight decay."""
    if not scales:
        raise ValueError("lsq_scales needs learned scales: set learned_scales=true (statistics scales have no parameter)")
    moved = {id(scale.parameter) for scale in scales}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in moved]
    parameters = [scale.parameter for scale in scales]
    if training.optimizer == "Adam":
        own = torch.optim.Adam(parameters, lr=training.lr, betas=(0.9, 0.999), weight_decay=0.0)
    elif training.optimizer == "SGD":
        own = torch.optim.SGD(parameters, lr=training.lr, momentum=0.9, weight_decay=0.0)
    else:
        raise ValueError(f"scale_optimizer {training.optimizer!r} is not one of Adam, SGD")

    def step_scales(*_) -> None:
        own.step()
        own.zero_grad()

    optimizer.register_step_post_hook(step_scales)
    return own


class ResumableTrainer(DetectionTrainer):
    """DetectionTrainer on a prepared nn.Module, checkpointing state dicts to `run_dir` every epoch."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        overrides: dict[str, Any],
        run_dir: Path,
        precision: Precision = "off",
        ema: dict[str, float],
        on_epoch: Callable[[dict[str, Any]], None],
        state_fingerprint: str,
        resume_state: dict[str, Any] | None = None,
        validation_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        after_optimizer_step: Callable[[torch.nn.Module], None] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        history: list[dict[str, Any]] | None = None,
        lr_hold_epochs: int = 0,
        validate_epoch: Callable[[int], bool] | None = None,
        validate_live: bool = False,
        epoch_diagnostics: Callable[["ResumableTrainer"], dict[str, Any]] | None = None,
        scale_training: ScaleTraining | None = None,
        record_per_image: bool = False,
    ):
        if validate_live and validation_model is None:
            raise ValueError("validate_live needs a validation_model: the live weights are validated through a copy")
        if scale_training is not None and precision == "fp16":
            raise ValueError("lsq_scales needs amp bf16 or off: fp16's GradScaler unscales the weights' optimizer only")
        if overrides.get("amp", False) is not False:
            raise ValueError("pass the precision as `precision`, with Ultralytics' amp off (see trainer_overrides)")
        super().__init__(overrides={**overrides, "save": True, "val": True})
        self.model = model  # setup_model() keeps an nn.Module as it is
        self.precision = precision
        self.run_dir = Path(run_dir)
        self.ema_schedule = ema
        self.on_epoch = on_epoch
        self.state_fingerprint = state_fingerprint
        self.resume_state = resume_state
        self.validation_model = validation_model
        self.after_optimizer_step = after_optimizer_step
        self.extra_state = extra_state or dict
        self.history = list(history or [])
        self.lr_hold_epochs = lr_hold_epochs
        self.validate_epoch = validate_epoch
        self.validate_live = validate_live
        self.epoch_diagnostics = epoch_diagnostics
        self.scale_training = scale_training
        self.record_per_image = record_per_image
        # The last validation's statistics per val image: "ema" (the validated copy) and, with validate_live, "live".
        self.per_image: dict[str, list[ImageStats]] = {}
        self.per_image_epoch: int | None = None
        self.scale_optimizer: torch.optim.Optimizer | None = None
        self._lsq_scales: list[LearnedScale] = []
        self._diagnostics: dict[str, Any] | None = None
        self._validated_epoch: int | None = None
        self._live_metrics: dict[str, float] | None = None
        self._validation_seconds: float | None = None
        self._epoch_started = time.time()
        self._divergence = DivergenceWatch()
        self.add_callback("on_pretrain_routine_end", lambda trainer: trainer._configure_ema_and_resume())
        self.add_callback("on_train_epoch_start", lambda trainer: trainer._start_epoch())
        # Every batch's loss, on the device; read at the next optimizer step, or at the end of the epoch for the
        # batches after its last step.
        self.add_callback("on_train_batch_end", lambda trainer: trainer._divergence.add_loss(trainer.loss))
        self.add_callback("on_train_epoch_end", lambda trainer: trainer._raise_if_diverged())

    def _setup_train(self) -> None:
        super()._setup_train()
        self._switch_on_precision()

    def _switch_on_precision(self) -> None:
        """Turn on what Ultralytics' setup would have for `precision`, minus its online `check_amp`: the loop runs
        its forward under `autocast(torch.bfloat16 if args.amp == "bf16" else amp)` and its backward through
        `scaler` (built disabled by the setup, as with amp off)."""
        if self.precision == "off":
            return
        self.amp = True
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
            if self.resume_state is not None and "scaler" in self.resume_state:
                self.scaler.load_state_dict(self.resume_state["scaler"])
        elif self.device.type == "cuda":
            self.args.amp = "bf16"  # Ultralytics' bf16 branch: bf16 autocast, no GradScaler
        elif torch.get_autocast_dtype(self.device.type) != torch.bfloat16:
            # The loop's autocast(True) takes the device's default dtype, bf16 on the CPU unless changed.
            raise ValueError(f"bf16 on {self.device}: its autocast dtype is {torch.get_autocast_dtype(self.device.type)}")

    def get_validator(self):
        return FP32TrainingValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def _configure_ema_and_resume(self) -> None:
        self.ema = ModelEMA(self.model, decay=self.ema_schedule["decay"], tau=self.ema_schedule["tau"])
        state = self.resume_state
        if state is None:
            return
        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.ema.load_state_dict(state["ema"])
        self.ema.updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scale_optimizer is not None:
            self.scale_optimizer.load_state_dict(state["scale_optimizer"])
        self.start_epoch = int(state["epoch"])
        self.best_fitness = state.get("best_fitness")
        self.scheduler.last_epoch = self.start_epoch - 1
        criterion = getattr(unwrap_model(self.model), "criterion", None)
        if criterion is not None and hasattr(criterion, "update"):
            # YOLOv10's one-to-many/one-to-one loss mix decays once per epoch; replay it up to here.
            criterion.updates = self.start_epoch - 1
            criterion.update()

    def _setup_scheduler(self) -> None:
        super()._setup_scheduler()
        if not self.lr_hold_epochs:
            return
        if self.args.cos_lr or self.lr_hold_epochs >= self.epochs:
            raise ValueError(
                f"lr_hold_epochs={self.lr_hold_epochs} needs the linear schedule (cos_lr off) and fewer hold epochs "
                f"than the run's {self.epochs}"
            )
        self.lf = linear_decay_then_hold(self.epochs, self.args.lrf, self.lr_hold_epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def build_optimizer(self, model, *args, **kwargs):
        optimizer = super().build_optimizer(model, *args, **kwargs)
        if self.scale_training is not None:
            self._lsq_scales = learned_scales(unwrap_model(model))
            self.scale_optimizer = separate_scale_optimizer(optimizer, self._lsq_scales, self.scale_training)
            return optimizer
        # Learned quantizer scales are step sizes, not weights: weight decay would shrink the grid.
        scales = {id(p) for name, p in unwrap_model(model).named_parameters() if "scaling_impl" in name}
        groups = {group.get("param_group"): group for group in optimizer.param_groups}
        if scales and "weight" in groups and "bn" in groups:
            moved = [p for p in groups["weight"]["params"] if id(p) in scales]
            groups["weight"]["params"] = [p for p in groups["weight"]["params"] if id(p) not in scales]
            groups["bn"]["params"] = list(groups["bn"]["params"]) + moved
        return optimizer

    def _start_epoch(self) -> None:
        self._epoch_started = time.time()
        if self.scale_optimizer is not None:  # the weights' schedule (self.lf), at the scales' own LR
            for group in self.scale_optimizer.param_groups:
                group["lr"] = self.scale_training.lr * self.lf(self.epoch)
        if self.validate_epoch is not None:
            # Ultralytics validates an epoch when args.val is set, and always the last one.
            self.args.val = self.validate_epoch(self.epoch + 1)

    def _raise_if_diverged(self, gradients: list[torch.Tensor] | None = None) -> None:
        what = self._divergence.read(gradients or ())  # one host sync, if anything is left to read
        if what is not None:
            raise TrainingDiverged(self.epoch + 1, what)

    def optimizer_step(self) -> None:
        # Before the step, so a non-finite loss or gradient never reaches the weights or the EMA.
        self._divergence.add_loss(self.loss)  # this batch's (its on_train_batch_end comes after the step)
        self._raise_if_diverged(gradients_to_check(self.model.parameters(), self.scaler))
        scale_lsq_gradients(self._lsq_scales)  # before Ultralytics clips the gradients, as in LSQ's graph
        super().optimizer_step()
        if self.after_optimizer_step is None:
            return
        model = unwrap_model(self.model)
        try:
            self.after_optimizer_step(model)
        except RuntimeError:
            if all(torch.isfinite(p).all() for p in model.parameters()):
                raise
            raise TrainingDiverged(self.epoch + 1, "the weights") from None

    def validate(self):
        self._validated_epoch = self.epoch + 1
        started = time.perf_counter()
        held = self.ema.ema
        with preserved_random_state():
            try:
                if self.validation_model is not None:
                    self.ema.ema = self.validation_model(held)
                with self._recording("ema"):
                    result = super().validate()
                if self.validate_live:
                    # The validator evaluates `ema.ema`, so the live weights' validation copy stands in for it (a
                    # copy: the validator switches its model to eval mode). Fitness and best_fitness stay the EMA
                    # copy's; the validator's own `metrics` and its on_val_* callbacks (logging integrations) see both.
                    self.ema.ema = self.validation_model(unwrap_model(self.model))
                    with self._recording("live"):
                        self._live_metrics = metrics_from_ultralytics(self.validator(self))
                if self.epoch_diagnostics is not None:
                    # Once per validated epoch, on the live weights, outside the training step.
                    self._diagnostics = self.epoch_diagnostics(self)
            finally:
                self.ema.ema = held
        self._validation_seconds = time.perf_counter() - started
        if self.validate_live and not math.isfinite(self._live_metrics["map50_95"]):
            raise TrainingDiverged(self.epoch + 1, "the live weights' validation mAP50-95")
        return result

    @contextlib.contextmanager
    def _recording(self, which: str):
        """Keep the per-image statistics of the validation inside the block as `per_image[which]`."""
        if not self.record_per_image:
            yield
            return
        if which == "ema":  # the first validation of an epoch: the previous epoch's statistics go
            self.per_image, self.per_image_epoch = {}, self._validated_epoch
        with recording_per_image(self.validator) as images:
            yield
        self.per_image[which] = images

    def _handle_nan_recovery(self, epoch: int) -> bool:
        # Ultralytics would reload a pickled last.pt; a diverged QAT run is a result to report instead.
        if self.fitness is not None and not math.isfinite(float(self.fitness)):
            raise TrainingDiverged(epoch + 1, "the validation fitness")
        return False

    def save_model(self) -> bool:
        losses = {k.split("/")[-1]: float(v) for k, v in (self.tloss or {}).items()}
        validated = self._validated_epoch == self.epoch + 1
        metrics = metrics_from_ultralytics(self.metrics or {})
        record = {
            "epoch": self.epoch + 1,
            # Unvalidated epochs would otherwise carry the last validated epoch's metrics.
            **(metrics if validated else dict.fromkeys(metrics)),
            **({"live": self._live_metrics if validated else dict.fromkeys(metrics)} if self.validate_live else {}),
            "box_loss": losses.get("box_loss"),
            "cls_loss": losses.get("cls_loss"),
            "dfl_loss": losses.get("dfl_loss"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "batch": int(self.batch_size),  # after any OOM halving: see training_batch
            "seconds": time.time() - self._epoch_started,
            # Of `seconds`: what this epoch's validations (and diagnostics) took, to check a cadence's cost.
            "validation_seconds": self._validation_seconds if validated else None,
            **self.extra_state().get("epoch_fields", {}),
            **({"diagnostics": self._diagnostics if validated else None} if self.epoch_diagnostics else {}),
        }
        self.history = [h for h in self.history if h["epoch"] < record["epoch"]] + [record]
        # History first, then the state that names the epoch: a kill in between leaves a history one
        # epoch ahead of the state, which resume trims back, so no epoch is ever counted twice.
        write_json_atomic(self.run_dir / HISTORY_FILE, self.history)
        state = {
            "epoch": self.epoch + 1,
            "model": unwrap_model(self.model).state_dict(),
            "ema": self.ema.ema.state_dict(),
            "ema_updates": int(self.ema.updates),
            "optimizer": self.optimizer.state_dict(),
            **({"scale_optimizer": self.scale_optimizer.state_dict()} if self.scale_optimizer is not None else {}),
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),  # fp16's loss scale
            "best_fitness": None if self.best_fitness is None else float(self.best_fitness),
            "fingerprint": self.state_fingerprint,
            **self.extra_state().get("tensors", {}),
        }
        with atomic_path(self.run_dir / STATE_FILE) as tmp:
            torch.save(on_cpu(state), tmp)
        self.on_epoch(record)
        return True

    def final_eval(self) -> None:
        """Skipped: the last epoch's validation of the EMA copy is the run's final evaluation."""

    def plot_metrics(self) -> None:
        """Skipped: plots are ours (comparison), and Ultralytics' would need a downloaded font."""


class FP32TrainingValidator(DetectionValidator):
    """Ultralytics' detection validator, in fp32 also when the trainer trains under AMP.

    Ultralytics validates an AMP run in fp16 (fp16 images and autocast, whenever `trainer.amp` is set off the
    CPU). Every other figure of a run (PTQ epoch 0, the FP reference, QC before/after, the export) comes from the
    standalone validator in fp32, and a `before`/`after` pair or an epoch-to-epoch curve must differ in weights
    only, not in precision (`evaluation_settings` records it). Validation is forward-only over the val set, so
    fp32 there costs a fraction of what AMP saves in training.
    """

    def __call__(self, trainer=None, model=None, **kwargs):
        if trainer is None:
            return super().__call__(trainer, model, **kwargs)
        amp, trainer.amp = trainer.amp, False  # what the validator reads to choose fp16
        try:
            return super().__call__(trainer, model, **kwargs)
        finally:
            trainer.amp = amp


def load_resume_state(run_dir: Path, fingerprint: str, planned_epochs: int) -> tuple[dict | None, list[dict], str]:
    """The saved state to resume from (or None), the history up to it, and a sentence saying what happened."""
    state_path = Path(run_dir) / STATE_FILE
    history_path = Path(run_dir) / HISTORY_FILE
    if not state_path.is_file():
        return None, [], "fresh start"
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a state file torn by a crash is not resumable
        return None, [], f"fresh start: the saved state {state_path} could not be read ({exc})"
    if state.get("fingerprint") != fingerprint:
        return None, [], "fresh start: the saved state belongs to different settings or inputs"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    epoch = int(state["epoch"])
    history = [h for h in history if h["epoch"] <= epoch]
    if epoch >= planned_epochs:
        return state, history, f"already complete: all {planned_epochs} epochs were trained earlier"
    return state, history, f"resumed after epoch {epoch} of {planned_epochs}"
