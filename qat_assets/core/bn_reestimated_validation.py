"""BN re-estimation before every QAT validation (setting `bn_reestimate_every_eval`): the per-epoch `+BN` curve.

The reference code (oscillations-qat) re-estimates BN statistics before each evaluation. Here that is a
measurement beside the run, never part of it: at the end of every epoch the trainer will validate, a copy
of the EMA weights and a copy of the live weights (the trainer's own validation copies: frozen quantized
weights) get their BN statistics re-estimated on the trainer's training dataset, with the current epoch's
transforms, and are validated by the trainer's validator. The trained weights, their BN buffers and the
training's random streams are not touched (a test checks the trained weights bit for bit).

Each such epoch of the history gets `bn_reestimated: {"ema": metrics, "live": metrics}`, each with the
seconds its re-estimation and validation took.
It attaches through an Ultralytics callback, so the trainer needs no change.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from torch import nn
from ultralytics.utils.torch_utils import unwrap_model

from .bn_reestimation import reestimate_bn_statistics
from .bn_reestimation_data import seeded_random_state, shuffled_image_batches
from .evaluate import metrics_from_ultralytics
from .trainer import ResumableTrainer, preserved_random_state


class BNReestimatedValidation:
    """Measures the `+BN` metrics of a ResumableTrainer's EMA and live weights at every validated epoch."""

    def __init__(self, trainer: ResumableTrainer, batches: int, seed: int):
        self.trainer = trainer
        self.batches = batches
        self.seed = seed
        self._measured: tuple[int, dict[str, Any]] | None = None
        # The end of the epoch's training, before the trainer validates: the weights are final for the epoch.
        trainer.add_callback("on_train_epoch_end", lambda _: self._measure())

    def epoch_fields(self) -> dict[str, Any]:
        """The history fields of the epoch being saved: its `+BN` metrics, or None when it was not measured."""
        epoch = self.trainer.epoch + 1
        measured = self._measured[1] if self._measured and self._measured[0] == epoch else None
        return {"bn_reestimated": measured}

    def _measure(self) -> None:
        trainer = self.trainer
        epoch = trainer.epoch + 1
        if not (trainer.args.val or epoch >= trainer.epochs):  # Ultralytics validates these epochs
            return
        make_copy = trainer.validation_model or copy.deepcopy
        measured: dict[str, Any] = {}
        for which, weights in (("ema", trainer.ema.ema), ("live", unwrap_model(trainer.model))):
            started = time.perf_counter()
            model = make_copy(weights)
            # Seeded per epoch: the same batches for both copies, and none of the training's random draws.
            with seeded_random_state(self.seed + epoch):
                images = shuffled_image_batches(
                    trainer.train_loader.dataset, trainer.batch_size, trainer.args.workers, trainer.device,
                    seed=self.seed + epoch,
                )
                reestimate_bn_statistics(model, images, self.batches)
            measured[which] = {**self._validate(model), "seconds": time.perf_counter() - started}
        self._measured = (epoch, measured)

    def _validate(self, model: nn.Module) -> dict[str, float]:
        """The trainer's validator on `model`: it evaluates `trainer.ema.ema`, so `model` stands in for it."""
        trainer = self.trainer
        held = trainer.ema.ema
        with preserved_random_state():
            try:
                trainer.ema.ema = model
                return metrics_from_ultralytics(trainer.validator(trainer))
            finally:
                trainer.ema.ema = held
