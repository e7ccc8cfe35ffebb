"""A diverged run (a NaN/Inf loss or gradient) found with one host sync per optimizer step.

Why one: every read of a device value on the host (`bool(t)`, `float(t)`) makes the host wait for the GPU to
drain its queue. The check used to read the loss twice per batch and the gradients once per step, after one
`aminmax` per parameter (over 300 small kernels for yolov10n). Here each batch's loss only adds to a flag on
the device, and the flag and one reduction over all gradients are read together, once, before each optimizer
step. The run stops exactly where it used to: before a non-finite value reaches the weights or the EMA, in the
epoch of the batch it came from, at most `accumulate - 1` batches after that batch (the batches in between
only add to the gradients). `ResumableTrainer` (core/trainer.py) reads the flag once more at the end of each
epoch, for the batches after its last optimizer step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

LOSS = "the training loss"
GRADIENT = "a gradient"


def nonfinite_gradients(gradients: Sequence[torch.Tensor], fused: bool | None = None) -> torch.Tensor | None:
    """True (a 0-dim bool tensor on the gradients' device; no host sync) when any gradient value is NaN or
    +-inf; None when there is no non-empty gradient.

    A tensor's inf-norm (max |value|) and its min and max are non-finite exactly when one of its values is,
    and finite values never overflow them, so huge finite gradients do not count. `fused` (default: off the
    CPU) takes all inf-norms in one multi-tensor kernel (`torch.nn.utils.get_total_norm`, as
    `clip_grad_norm_` does); on the CPU, where that falls back to one norm per tensor, `aminmax` per gradient
    was 10x faster (20 against 2 ms for yolov10n's 310 gradients on one thread)."""
    gradients = [g for g in gradients if g.numel()]
    if not gradients:
        return None
    if fused is None:
        fused = gradients[0].device.type != "cpu"
    if fused:
        extremes = torch.nn.utils.get_total_norm(gradients, norm_type=math.inf)
    else:
        extremes = torch.stack([value for g in gradients for value in torch.aminmax(g)])
    return ~torch.isfinite(extremes).all()


class DivergenceWatch:
    """Non-finite losses, folded on the device batch after batch, and gradients, read together on demand."""

    def __init__(self) -> None:
        self._nonfinite_loss: torch.Tensor | None = None  # any loss added since the last read was NaN/Inf
        self._last_loss: torch.Tensor | None = None

    def add_loss(self, loss: torch.Tensor | None) -> None:
        """Fold one batch's loss into the flag, on the device. The same tensor added again counts once."""
        if loss is None or loss is self._last_loss:
            return
        self._last_loss = loss
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self._nonfinite_loss = nonfinite if self._nonfinite_loss is None else self._nonfinite_loss | nonfinite

    def read(self, gradients: Sequence[torch.Tensor] = ()) -> str | None:
        """What became NaN/Inf since the last read: `LOSS` (first), `GRADIENT`, or None. One host sync, none when
        there is nothing to read. Resets the loss flag."""
        flags = [(what, flag) for what, flag in ((LOSS, self._nonfinite_loss), (GRADIENT, nonfinite_gradients(gradients)))
                 if flag is not None]
        self._nonfinite_loss = None
        if not flags:
            return None
        values = torch.stack([flag for _, flag in flags]).tolist()  # the one host sync
        return next((what for (what, _), value in zip(flags, values) if value), None)
