"""Weight-oscillation diagnostic of Nagel et al. (ICML 2022, "Overcoming Oscillations in QAT").

A weight oscillates at a step when its integer value changes in the opposite direction to its last
non-zero change. Each weight keeps an exponential moving average of that event,
f <- m * o + (1 - m) * f, updated at every step; a weight counts as oscillating while f > threshold.
The fraction of oscillating weights (per layer and overall) is the diagnostic reported during QAT.

As in the reference code (Qualcomm-AI-research/oscillations-qat), only layers quantized to 4 bits or
fewer are tracked (8-bit layers barely oscillate and would dilute the fraction), and the threshold sits
well above the momentum: one flip lifts f to exactly the momentum, so a threshold below it would mark a
weight as oscillating for about ln(m / threshold) / m steps after a single flip (about 70 at m = 0.01,
threshold 0.005). The default threshold of 3 x momentum needs several flips in quick succession.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from qat_assets.core.flat_weight_quant import FlatQuantWorkspace, StepWeights
from qat_assets.core.quantize import prepare_step_weights

DEFAULT_MOMENTUM = 0.01
DEFAULT_THRESHOLD = 3 * DEFAULT_MOMENTUM
TRACKED_MAX_BIT_WIDTH = 4


class OscillationTracker:
    def __init__(
        self, momentum: float = DEFAULT_MOMENTUM, threshold: float = DEFAULT_THRESHOLD,
        max_bit_width: int = TRACKED_MAX_BIT_WIDTH,
    ) -> None:
        self.momentum = momentum
        self.threshold = threshold
        self.max_bit_width = max_bit_width
        self._previous: dict[str, torch.Tensor] = {}  # last integer values (int16, int32 above 8 bits)
        self._direction: dict[str, torch.Tensor] = {}  # sign of the last non-zero change (0 before any)
        self._frequency: dict[str, torch.Tensor] = {}  # EMA of oscillation events
        # Per set of layers updated together: the flat buffers their entries above are views of.
        self._flat: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Buffers reused from step to step (not state: not saved): `update_model`'s weight quantization's, and
        # the per-set scratch tensors of `update_layers`.
        self._workspaces: dict[tuple, FlatQuantWorkspace] = {}
        self._scratch: dict[tuple[str, ...], tuple[torch.Tensor, ...]] = {}

    def update(self, name: str, integer_weights: torch.Tensor) -> None:
        """Record one step of one layer. The first call for a layer only sets its reference values."""
        self.update_layers([(name, integer_weights)])

    def update_layers(self, layers: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Record one step of several layers at once, with a few operations over all their weights.

        The first call for a set of layers only sets their reference values. Each layer's state is a view of
        one flat buffer per set, updated in place, so `frequencies`, `per_layer` and `state_dict` see it.
        """
        if not layers:  # nothing at or below max_bit_width (e.g. an 8-bit run)
            return
        names = tuple(name for name, _ in layers)
        # Narrow integers: most of the cost here is memory traffic. Codes of up to 8 bits, and their
        # differences, fit int16.
        dtype = torch.int16 if self.max_bit_width <= 8 else torch.int32
        tracked = [name in self._previous for name in names]
        if names not in self._flat and any(tracked) and not all(tracked):
            raise ValueError(f"oscillation state exists for some of {list(names)} but not all; "
                             "track a layer always alone or always with the same others")
        current, difference, change, work = self._step_buffers(names, sum(c.numel() for _, c in layers), dtype,
                                                               layers[0][1].device)
        start = 0
        for _, codes in layers:  # copied straight into the narrow type: no float concatenation
            current[start:start + codes.numel()].copy_(codes.detach().reshape(-1))
            start += codes.numel()
        if names not in self._flat:
            if not any(tracked):
                self._bind_flat(layers, current.clone(), torch.zeros_like(current, dtype=torch.int8),
                                torch.zeros(current.shape, dtype=torch.float32, device=current.device))
                return
            # Tracked before in another grouping, or resumed from a state dict (possibly CPU-mapped).
            self._bind_flat(layers, *(
                torch.cat([table[name].reshape(-1) for name in names]).to(current.device, table_dtype)
                for table, table_dtype in ((self._previous, dtype), (self._direction, torch.int8),
                                           (self._frequency, torch.float32))
            ))
        previous, direction, frequency = self._flat[names]
        # int8 arithmetic instead of comparisons and torch.where, which are several times slower on the CPU;
        # every result goes into a buffer kept from the last step (a new tensor page-faults on the CPU).
        change.copy_(torch.sub(current, previous, out=difference).sign_())  # -1, 0 or +1
        oscillated = torch.mul(change, direction, out=work).neg_().clamp_min_(0)  # 1 where both non-zero, opposite
        frequency.mul_(1.0 - self.momentum).add_(oscillated, alpha=self.momentum)
        keep = torch.abs(change, out=work).neg_().add_(1)  # 1 where there is no change
        direction.mul_(keep).add_(change)  # the change where there is one, else the last direction
        previous.copy_(current)

    def _step_buffers(self, names: tuple[str, ...], numel: int, dtype: torch.dtype, device: torch.device) -> tuple:
        """Scratch tensors for one step of the set `names`: current codes and their difference (`dtype`), the
        change and a work tensor (int8); kept for the next step."""
        buffers = self._scratch.get(names)
        if buffers is None or buffers[0].numel() != numel or buffers[0].dtype != dtype or buffers[0].device != device:
            buffers = (torch.empty(numel, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device),
                       torch.empty(numel, dtype=torch.int8, device=device),
                       torch.empty(numel, dtype=torch.int8, device=device))
            self._scratch[names] = buffers
        return buffers

    def _bind_flat(self, layers: Sequence[tuple[str, torch.Tensor]], previous: torch.Tensor, direction: torch.Tensor,
                   frequency: torch.Tensor) -> None:
        names = tuple(name for name, _ in layers)
        # A layer's state lives in one set's buffers only: sets sharing a layer with this one are dropped.
        for other in [other for other in self._flat if set(other) & set(names)]:
            del self._flat[other]
            self._scratch.pop(other, None)
        self._flat[names] = (previous, direction, frequency)
        sizes = [codes.numel() for _, codes in layers]
        for table, flat in zip((self._previous, self._direction, self._frequency), self._flat[names]):
            for (name, codes), part in zip(layers, flat.split(sizes)):
                table[name] = part.view(codes.shape)

    def update_model(self, model: nn.Module) -> None:
        """Record one step of every quantized conv at `max_bit_width` bits or fewer (the others are skipped).

        Called after each optimizer step: the weights are quantized here once, and the model's next
        forward reuses that result (`prepare_step_weights`) instead of quantizing them again.
        """
        self.update_quantized(prepare_step_weights(model, self._workspaces))

    def update_quantized(self, quantized: Mapping[str, StepWeights]) -> None:
        """Record one step from already fake-quantized weights and their integer codes, keyed by layer name."""
        self.update_layers([(name, weights.codes) for name, weights in quantized.items()
                            if weights.bit_width <= self.max_bit_width])

    def frequencies(self, name: str) -> torch.Tensor:
        return self._frequency[name]

    def per_layer(self) -> dict[str, float]:
        """Fraction of each layer's weights whose oscillation frequency is above the threshold."""
        return {name: (frequency > self.threshold).float().mean().item() for name, frequency in self._frequency.items()}

    def layer_statistics(self) -> dict[str, tuple[float, float]]:
        """Per layer: (fraction of weights oscillating, mean oscillation frequency), read with one host sync."""
        names = list(self._frequency)
        if not names:
            return {}
        per_layer = torch.stack([torch.stack([(f > self.threshold).float().mean(), f.float().mean()])
                                 for f in self._frequency.values()]).tolist()
        return {name: (fraction, frequency) for name, (fraction, frequency) in zip(names, per_layer)}

    def oscillating_fraction(self) -> float:
        """Fraction of all tracked weights that are oscillating (0.0 before any layer is tracked)."""
        oscillating = sum(int((f > self.threshold).sum()) for f in self._frequency.values())
        total = sum(f.numel() for f in self._frequency.values())
        return oscillating / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """Flat dict of tensors and floats, so it fits a weights_only checkpoint (resume)."""
        state: dict[str, torch.Tensor | float] = {"momentum": self.momentum, "threshold": self.threshold}
        for name in self._frequency:
            state[f"previous/{name}"] = self._previous[name]
            state[f"direction/{name}"] = self._direction[name]
            state[f"frequency/{name}"] = self._frequency[name]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor | float]) -> None:
        self.momentum = float(state["momentum"])
        self.threshold = float(state["threshold"])
        self._previous, self._direction, self._frequency = {}, {}, {}
        self._flat, self._scratch = {}, {}
        tables = {"previous": self._previous, "direction": self._direction, "frequency": self._frequency}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind in tables:
                tables[kind][name] = value.clone()
