"""Learned scales as LSQ trains them (Esser et al. 2020): the scale gradient against the paper's equation, and
the scales' own optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qat_assets.core.quantize import (
    StepQuantConv2d,
    learned_scales,
    quantize_all,
    scale_lsq_gradients,
    weight_quantizer,
)
from qat_assets.core.trainer import ScaleTraining, separate_scale_optimizer


def learned_conv(bit_width: int, per_channel: bool) -> nn.Sequential:
    torch.manual_seed(0)
    conv = StepQuantConv2d(3, 4, kernel_size=3, bias=False,
                           weight_quant=weight_quantizer(bit_width, learned_scales=True, per_channel_scales=per_channel))
    with torch.no_grad():
        conv.quant_weight()  # max-abs initialisation: every |w / s| <= Q_p
        # Two weights past the clipping threshold (of their channel, and of the tensor): |w / s| >= 1.5 Q_p; the
        # others shrunk off the threshold, where the equation's two branches meet (|w / s| = Q_p exactly).
        largest = conv.weight.abs().max()
        conv.weight.mul_(0.9)
        conv.weight[0, 0, 0, :2] = torch.tensor([1.5, -1.5]) * largest
    return nn.Sequential(conv)


def lsq_step_gradient(weights: torch.Tensor, step: torch.Tensor, upstream: torch.Tensor, q_p: int) -> torch.Tensor:
    """LSQ's eq. 3, summed over the weights of each step: d(v_hat)/ds = -v/s + round(v/s) inside the range, -Q_N or
    Q_P outside (narrow range: Q_N = Q_P). Per output channel, or one value for the tensor."""
    ratio = weights / step
    derivative = torch.where(ratio.abs() < q_p, torch.round(ratio) - ratio, torch.sign(ratio) * q_p)
    per_weight = upstream * derivative
    return per_weight.flatten(1).sum(1) if step.numel() > 1 else per_weight.sum().reshape(1)


@pytest.mark.parametrize(("bit_width", "per_channel"), [(4, True), (4, False), (3, True)])
def test_the_scale_gradient_is_lsqs_equation_times_its_gradient_scale(bit_width, per_channel):
    model = learned_conv(bit_width, per_channel)
    [scale] = learned_scales(model)
    conv = model[0]
    q_p = 2 ** (bit_width - 1) - 1
    assert scale.max_int == q_p
    assert scale.weights_per_scale == (27 if per_channel else 108)
    assert scale.lsq_gradient_factor == pytest.approx(1 / math.sqrt(scale.weights_per_scale * q_p))
    quantized = quantize_all(model)["0"].quantized  # the training path (one flat pass)
    step = quantized.scale.detach()
    ratio = conv.weight.detach() / step
    # The paper clamps v/s before rounding, Brevitas rounds then clamps: they differ only for Q_p < |v/s| < Q_p + 1/2.
    assert not ((ratio.abs() > q_p) & (ratio.abs() < q_p + 0.5)).any()
    assert (ratio.abs() > q_p + 0.5).sum() == 2  # the clipped branch of the equation is exercised
    upstream = torch.randn_like(conv.weight)
    (upstream * quantized.value).sum().backward()
    scale_lsq_gradients([scale])
    # Brevitas learns the threshold t = Q_p * s, so dL/dt = dL/ds / Q_p.
    expected = scale.lsq_gradient_factor * lsq_step_gradient(conv.weight.detach(), step, upstream, q_p) / q_p
    assert torch.allclose(scale.parameter.grad.flatten(), expected, rtol=1e-5, atol=1e-7)


def test_the_scales_get_their_own_optimizer_stepped_with_the_weights():
    model = learned_conv(4, per_channel=True)
    [scale] = learned_scales(model)
    weights = model[0].weight
    main = torch.optim.SGD([{"params": [weights]}, {"params": [scale.parameter]}], lr=0.1)
    own = separate_scale_optimizer(main, [scale], ScaleTraining("Adam", 1e-3))
    assert all(p is not scale.parameter for group in main.param_groups for p in group["params"])
    weights_before, scale_before = weights.detach().clone(), scale.parameter.detach().clone()
    quantize_all(model)["0"].quantized.value.square().sum().backward()
    weights_grad, scale_grad = weights.grad.clone(), scale.parameter.grad.clone()
    main.step()  # steps the scales' Adam too, then zeroes their gradient
    assert torch.allclose(weights, weights_before - 0.1 * weights_grad)
    # Adam's first step moves each scale by its LR against the gradient's sign.
    assert torch.allclose(scale.parameter, scale_before - 1e-3 * scale_grad.sign(), atol=1e-8)
    assert scale.parameter.grad is None or not scale.parameter.grad.any()
    assert own.param_groups[0]["weight_decay"] == 0.0


def test_lsq_scales_without_learned_scales_is_refused_by_name():
    with pytest.raises(ValueError, match="learned_scales=true"):
        separate_scale_optimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), [], ScaleTraining("Adam", 1e-5))
