"""Per-epoch, per-layer diagnostics that tell why a QAT run collapses (or does not).

Each quantity is the signature of one candidate mechanism (issue 25):
- the fraction of weights at integer code 0 and the output channels whose codes are all 0: a step size
  that outgrows the bulk of the weights rounds them away (per-tensor max-abs scales "ratchet");
- max|w| / RMS(w) of the latent weights: one outlier sets a per-tensor max-abs step for everyone;
- mean over channels of |log(running_var / batch_var)| of each BatchNorm on a fixed training batch:
  evaluation normalizes with the running statistics, training with the batch's, so a growing mismatch
  collapses evaluation while the training loss stays fine (both variances include the layer's eps, as
  they are what it divides by);
- the oscillating fraction at the tracker's threshold and the mean oscillation frequency (Nagel et al. 2022);
- the mean step size (scale) of each layer: its trajectory, whether scales are learned or statistics.

They describe the live weights (what training trains and the baseline evaluates), measured once per
epoch at validation time, outside the training step: everything is read back with a few host syncs per
epoch, none per step. The weights are quantized once for all of it (`quantize_all`, one flat pass); the BN
mismatch costs one no-grad forward of a training batch through a frozen copy kept from epoch to epoch
(benchmarks/bench_qat.py prints the cost against a training step).

Model-level summaries are taken over the layers at the model's lowest bit width (the body: 8-bit first and
head-output convs have almost no zero codes and would dilute the fractions), weighted by their weight counts.
"""

from __future__ import annotations

import random
import time
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .oscillation import OscillationTracker
from .flat_weight_quant import StepWeights
from .quantize import freeze_quantized_weights, quantize_all, quantized_modules
from .trainer import preserved_random_state

SPREAD_CAP_INVERSE = 1e-6  # the channel-norm spread's cap is 1e6


@torch.no_grad()
def weight_code_statistics(model: nn.Module, quantized: Mapping[str, StepWeights] | None = None) -> list[dict[str, Any]]:
    """Per quantized conv: bit width, weight count, output channels, fraction of codes at 0, output channels
    whose codes are all 0, max|w| / RMS(w) of the latent weights, the mean step size, RMS(w), and the
    channel-norm spread: the 90th over the 10th percentile of the output channels' RMS, at most 1e6 (reached
    once the interpolated 10th percentile is exactly 0: a tenth of the channels or a few more). Decay that
    shrinks the channels a small gradient leaves alone (coupled L2 under Adam) lowers RMS(w) and widens the
    spread before those channels round to all-zero codes.

    `quantized`: the layers' weights as `quantize_all(model)` gives them, when the caller has them already."""
    quantized_layers = quantize_all(model) if quantized is None else quantized
    names, sizes, per_layer = [], [], []
    for name, module in quantized_modules(model):
        quantized, codes, bit_width = quantized_layers[name]
        zero = codes == 0
        weight = module.weight.detach().float()
        rms = weight.square().mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero layer: ratio 0
        channel_rms = weight.flatten(1).square().mean(1).sqrt()
        low, high = torch.quantile(channel_rms, torch.tensor([0.1, 0.9], device=channel_rms.device))
        # Capped (JSON has no inf): decay drives whole channels to exactly 0 (p10 = 0), or nearly all (p90 = 0).
        spread = torch.where(high > 0, high / low.clamp_min(high * SPREAD_CAP_INVERSE), high.new_tensor(1 / SPREAD_CAP_INVERSE))
        names.append(name)
        sizes.append((bit_width, weight.numel(), weight.shape[0]))
        per_layer.append(torch.stack([
            zero.float().mean(), zero.flatten(1).all(1).sum().float(), weight.abs().max() / rms,
            quantized.scale.float().mean(), rms, spread,
        ]))
    values = torch.stack(per_layer).tolist() if per_layer else []  # one host sync for all layers
    return [
        {"name": name, "bit_width": bits, "weights": count, "out_channels": channels, "zero_code_fraction": zero,
         "dead_channels": int(dead), "max_over_rms": ratio, "scale": scale, "weight_rms": weight_rms,
         "channel_norm_spread": spread}
        for name, (bits, count, channels), (zero, dead, ratio, scale, weight_rms, spread) in zip(names, sizes, values)
    ]


@torch.no_grad()
def bn_variance_mismatch(model: nn.Module, images: torch.Tensor) -> list[dict[str, Any]]:
    """Per BatchNorm of `model`: mean over channels of |log((running_var + eps) / (batch_var + eps))| on `images`.

    The batch variance is the one training normalizes with: each BN's input under a train-mode forward (so
    every earlier BN also normalizes with batch statistics), unbiased as BN's running update uses it. The
    forward updates `model`'s running statistics: pass a copy (`FrozenShadow`), never the trained model.
    """
    rows: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
            batch_var = inputs[0].float().var(dim=(0, 2, 3), unbiased=True)
            running_var = module.running_var.float()  # before this forward's update: the pre-hook runs first
            rows.append((name, (torch.log(running_var + module.eps) - torch.log(batch_var + module.eps)).abs().mean()))
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, nn.BatchNorm2d) and module.running_var is not None]
    try:
        model.train()(images)
    finally:
        for handle in handles:
            handle.remove()
    values = torch.stack([value for _, value in rows]).tolist() if rows else []
    return [{"name": name, "log_var_mismatch": value} for (name, _), value in zip(rows, values)]


class FrozenShadow:
    """A frozen copy of a quantized model (`freeze_quantized_weights`), built once and refreshed in place.

    Why: deep-copying the model costs about as much as a training step on the CPU; copying its current
    weights and buffers into a kept copy costs next to nothing. The refreshed copy equals a fresh
    `freeze_quantized_weights(model)`.
    """

    def __init__(self) -> None:
        self._copy: nn.Module | None = None

    @torch.no_grad()
    def of(self, model: nn.Module, quantized: Mapping[str, StepWeights]) -> nn.Module:
        if self._copy is None:
            self._copy = freeze_quantized_weights(model, quantized)
            return self._copy
        source = model.state_dict()
        for key, tensor in self._copy.state_dict().items():
            if key in source:
                tensor.copy_(source[key])
        for name, _ in quantized_modules(model):  # the quantized convs hold their fake-quantized weights
            self._copy.get_submodule(name).weight.copy_(quantized[name].quantized.value)
        return self._copy


def fixed_training_images(dataset, count: int, seed: int = 0) -> torch.Tensor:
    """`count` images of the training set through its own (augmenting) transforms, as uint8, the same for every
    call with the same seed; the random state of training is left as it was."""
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty: no batch to measure BatchNorm statistics on")
    with preserved_random_state():
        np.random.seed(seed)
        torch.manual_seed(seed)
        random.seed(seed)  # the training augmentations (mosaic, affine, flips) draw from Python's random
        indices = torch.randperm(len(dataset))[:count].tolist()
        items = [dataset[i] for i in indices]
    return dataset.collate_fn(items)["img"]


def model_summary(layers: list[dict[str, Any]], bn: list[dict[str, Any]], oscillation: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Whole-model figures a person reads: weighted means over the lowest-bit-width layers, totals and the worst layer."""
    summary: dict[str, Any] = {}
    if layers:
        lowest = min(layer["bit_width"] for layer in layers)
        body = [layer for layer in layers if layer["bit_width"] == lowest]
        weights = sum(layer["weights"] for layer in body)
        worst_zero = max(body, key=lambda layer: layer["zero_code_fraction"])
        worst_ratio = max(body, key=lambda layer: layer["max_over_rms"])
        summary.update(
            bit_width=lowest, layers=len(body),
            zero_code_fraction=sum(layer["zero_code_fraction"] * layer["weights"] for layer in body) / weights,
            worst_zero_code_fraction=worst_zero["zero_code_fraction"], worst_zero_code_layer=worst_zero["name"],
            dead_channels=sum(layer["dead_channels"] for layer in body),
            out_channels=sum(layer["out_channels"] for layer in body),
            max_over_rms=float(np.median([layer["max_over_rms"] for layer in body])),
            weight_rms=float(np.median([layer["weight_rms"] for layer in body])),
            channel_norm_spread=float(np.median([layer["channel_norm_spread"] for layer in body])),
            worst_max_over_rms=worst_ratio["max_over_rms"], worst_max_over_rms_layer=worst_ratio["name"],
        )
    if bn:
        worst = max(bn, key=lambda row: row["log_var_mismatch"])
        summary.update(
            bn_log_var_mismatch=float(np.mean([row["log_var_mismatch"] for row in bn])),
            worst_bn_log_var_mismatch=worst["log_var_mismatch"], worst_bn_layer=worst["name"],
        )
    counts = {layer["name"]: layer["weights"] for layer in layers}
    tracked = {name: stats for name, stats in oscillation.items() if name in counts}
    if tracked:
        total = sum(counts[name] for name in tracked)
        summary.update(
            oscillating_fraction=sum(fraction * counts[name] for name, (fraction, _) in tracked.items()) / total,
            oscillation_frequency=sum(frequency * counts[name] for name, (_, frequency) in tracked.items()) / total,
        )
    return summary


class CollapseDiagnostics:
    """Measures the diagnostics of a QAT model once per epoch; the BN batch is drawn once and kept fixed."""

    def __init__(self, oscillation: OscillationTracker, batch_images: int, seed: int = 0):
        self.oscillation = oscillation
        self.batch_images = batch_images
        self.seed = seed
        self._images: torch.Tensor | None = None
        self._shadow = FrozenShadow()

    def measure(self, model: nn.Module, dataset) -> dict[str, Any]:
        """The epoch's record: model-level summary, per-layer rows (codes, scales, oscillation) and per-BN rows."""
        started = time.perf_counter()
        if self._images is None:
            self._images = fixed_training_images(dataset, self.batch_images, self.seed)
        device = next(model.parameters()).device
        quantized = quantize_all(model)
        layers = weight_code_statistics(model, quantized)
        bn = bn_variance_mismatch(self._shadow.of(model, quantized), self._images.to(device).float() / 255)
        oscillation = self.oscillation.layer_statistics()
        for layer in layers:
            fraction, frequency = oscillation.get(layer["name"], (None, None))
            layer.update(oscillating_fraction=fraction, oscillation_frequency=frequency)
        return {"model": {**model_summary(layers, bn, oscillation), "seconds": time.perf_counter() - started},
                "layers": layers, "bn": bn}
