"""BN re-estimation after QAT (Nagel et al., ICML 2022, section 4.1), the statistics-only mitigation.

Oscillating weights leave BatchNorm running statistics that describe none of the weights the model ends
with: an exponential average over steps whose weights kept flipping. Re-estimation forgets them and
replaces them with the plain average of per-batch statistics of the final weights, measured on training
batches in train mode with no gradients:

    running_mean = 1/B sum_b mean_b,    running_var = 1/B sum_b var_b (unbiased, as BatchNorm keeps it)

PyTorch's BatchNorm computes exactly that cumulative average when its momentum is None, so the model's own
forward pass does the work; momenta are restored afterwards. Nothing but the BN buffers changes.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn_statistics(
    model: nn.Module, batches: Iterable[torch.Tensor], max_batches: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Reset every BN's running statistics and re-measure them on up to `max_batches` image batches, in place.

    `batches` yields preprocessed image tensors (float, [0, 1]). The model's train/eval modes are restored.
    Returns how many batches and images were used and how far the statistics moved.
    """
    norms = batch_norms(model)
    if not norms:
        raise ValueError("the model has no BatchNorm layers; there are no statistics to re-estimate")
    if max_batches < 1:
        raise ValueError(f"BN re-estimation needs at least one batch, got max_batches={max_batches}")
    old = {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in norms}
    momenta = {name: bn.momentum for name, bn in norms}
    modes = {module: module.training for module in model.modules()}
    used, images, started = 0, 0, time.perf_counter()
    try:
        for _, bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average of the batch statistics
        model.train()
        for images_batch in itertools.islice(batches, max_batches):
            model(images_batch)
            used += 1
            images += images_batch.shape[0]
    finally:
        for name, bn in norms:
            bn.momentum = momenta[name]
        for module, training in modes.items():
            module.training = training
    if used == 0:
        for name, bn in norms:  # nothing measured: keep the statistics the model came with
            bn.running_mean.copy_(old[name][0])
            bn.running_var.copy_(old[name][1])
        raise ValueError("BN re-estimation got no batches; the training split is empty")
    shift = max(float(((bn.running_mean - old[n][0]).abs() / old[n][1].sqrt().clamp_min(1e-12)).max()) for n, bn in norms)
    if log is not None:
        log(f"BN re-estimation: {len(norms)} BN layers, {used} batches ({images} images)")
    return {
        "batches": used, "images": images, "layers": len(norms), "seconds": time.perf_counter() - started,
        "max_mean_shift_in_std": shift,
    }

