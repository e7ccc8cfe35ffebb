"""Ultralytics' DetectionTrainer, extended (not copied) for resumable, observable runs.

What the subclass changes, and why:
- checkpoints are state dicts (Brevitas quantizers do not pickle), written atomically every epoch
  together with the optimizer, EMA and history, so a killed worker resumes at the last full epoch;
- the EMA decay and ramp come from our settings (decay 0 for the baseline: the validated copy is then
  exactly the live model);
- validation can run on a frozen copy of the EMA model (quantized weights computed once, not on every
  forward), and can validate the live weights as well (`validate_live`): the EMA never feeds back into
  training, so one run then gives both the EMA method's history and the no-EMA baseline's;
- a NaN/Inf loss or fitness stops the run as diverged instead of Ultralytics' reload-from-last.pt;
- learned quantizer scales get no weight decay; with `scale_training` (LSQ) they get LSQ's gradient scale
  and their own optimizer and LR;
- validation leaves the random state as it found it: Ultralytics' validation transforms draw from Python's
  `random`, which the training augmentations also draw from, so without this the trained weights would
  depend on how often the run validated;
- `validate_epoch` can skip validations (an FP run needs its plateau window, not every epoch); a skipped
  epoch is recorded with no metrics rather than with the last validated epoch's;
- `epoch_diagnostics(trainer)` runs after each validation and its result is the epoch record's
  `diagnostics` (core/diagnostics.py: why a run collapses);
- with `record_per_image`, each validation keeps every val image's matching statistics of the EMA copy and
  of the live weights (`per_image`, `per_image_epoch`): the last epoch's give the within-seed bootstrap of
  EMA − live (core/within_seed.py) without validating the final weights again;
- each finished epoch is reported through `on_epoch` as a plain dict;
- the linear LR decay can end `lr_hold_epochs` before the run, which then holds the final LR (a run whose
  LR falls until its last epoch keeps gaining from the annealing alone, so it never shows a plateau).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

from .artifacts import atomic_path, on_cpu, write_json_atomic
from .evaluate import metrics_from_ultralytics
from .image_bootstrap import ImageStats, recording_per_image
from .models import variant_yaml
from .quantize import LearnedScale, learned_scales, scale_lsq_gradients
from .settings import Settings

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


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


def gradients_diverged(parameters: Iterable[torch.nn.Parameter], scaler: torch.amp.GradScaler) -> bool:
    """A non-finite gradient, as divergence. Not under AMP: there a non-finite scaled gradient is GradScaler's
    signal to skip that step and lower its scale (routine in the first steps), and a diverged run still shows
    as a non-finite loss."""
    if scaler.is_enabled():
        return False
    # A gradient's min or max is NaN or +-inf exactly when one of its values is (both propagate NaN). aminmax
    # reads each gradient once, with no temporary of its size, and there is one host sync for all: per
    # gradient 10x cheaper than the inf-norm (27 -> 3 ms for yolov10s' 322 gradients on one CPU thread),
    # which itself replaced a per-parameter `isfinite(grad).all()` (a mask per gradient and a sync each).
    extremes = [value for p in parameters if p.grad is not None and p.grad.numel() for value in torch.aminmax(p.grad)]
    return bool(extremes) and not bool(torch.isfinite(torch.stack(extremes)).all())


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


def trainer_overrides(
    settings: Settings, variant: str, data_yaml: Path, run_dir: Path, device: str, epochs: int, seed: int
) -> dict:
    """Ultralytics arguments shared by FP pretraining and QAT (AMP off: fake-quant and fp16 do not mix)."""
    return dict(
        model=variant_yaml(variant),  # recorded in args only: the trainer is handed a built module
        data=str(data_yaml), epochs=epochs, imgsz=settings.imgsz, batch=settings.batch,
        workers=settings.workers, device=device, seed=seed, deterministic=True, amp=False, plots=False,
        verbose=False, project=str(run_dir), name="ultralytics", exist_ok=True,
    )


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
        super().__init__(overrides={**overrides, "save": True, "val": True})
        self.model = model  # setup_model() keeps an nn.Module as it is
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
        self._epoch_started = time.time()
        self.add_callback("on_pretrain_routine_end", lambda trainer: trainer._configure_ema_and_resume())
        self.add_callback("on_train_epoch_start", lambda trainer: trainer._start_epoch())
        self.add_callback("on_train_batch_end", lambda trainer: trainer._check_loss_finite())

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
            if self.amp:
                raise ValueError("lsq_scales needs AMP off: GradScaler unscales the weights' optimizer only")
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

    def _check_loss_finite(self) -> None:
        if self.loss is not None and not torch.isfinite(self.loss).all():
            raise TrainingDiverged(self.epoch + 1, "the training loss")

    def optimizer_step(self) -> None:
        # Before the step, so a non-finite loss or gradient never reaches the weights or the EMA.
        self._check_loss_finite()
        if gradients_diverged(self.model.parameters(), self.scaler):
            raise TrainingDiverged(self.epoch + 1, "a gradient")
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
            "seconds": time.time() - self._epoch_started,
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
