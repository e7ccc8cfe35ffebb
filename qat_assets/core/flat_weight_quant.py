"""Fake-quantize the weights of many Brevitas convs in one pass over their concatenation.

Why: the QAT step quantizes every conv's weights once (StepQuantConv2d). Brevitas does that layer by
layer, about 30 small tensor ops per layer forward and backward, for 107 convs; at the embedded
profile's 64 px that alone costs more than the float training step (benchmarks/bench_qat.py). Here the
weights of all layers with the same quantizer configuration are concatenated and quantized with a
handful of elementwise ops.

What stays Brevitas: the quantizer configuration and its scale parameters; the scale's restriction
chain (Brevitas' own modules, called once on the concatenated scales); the bit width and integer range;
the result, one IntQuantTensor per layer. What is written here, because Brevitas has no multi-layer
form of it: the elementwise part of its `IntQuant` (divide, round, clamp, rescale) and that part's
gradient, which replays the operations autograd records for Brevitas' layer-by-layer graph (round is
straight-through, the clamp masks, the scale collects the gradients of its division and of its
multiplication, each summed over its channel like broadcasting's reduction). Values and gradients are
bit-identical to `module.quant_weight()` (qat_assets_tests/core/test_flat_weight_quant.py).

Only the configuration this project builds is taken (`flat_quantizable`): round-to-nearest integers, a
constant bit width, zero zero-point, learned float scales per conv or per output channel (Brevitas'
ParameterFromStats scaling, once initialised). Anything else is quantized by Brevitas layer by layer.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from brevitas.core.bit_width import BitWidthConst
from brevitas.core.function_wrapper import Identity, RoundSte, TensorClamp
from brevitas.core.quant import RescalingIntQuant
from brevitas.core.quant.delay import _NoDelay  # Brevitas' "no delay" marker; the delayed-quantization variant is not replayed
from brevitas.core.restrict_val import FloatRestrictValue
from brevitas.core.scaling import IntScaling, ParameterFromStatsFromParameterScaling
from brevitas.core.zero_point import ZeroZeroPoint
from brevitas.nn import QuantConv2d
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch.autograd.function import once_differentiable


class StepWeights(NamedTuple):
    """One layer's fake-quantized weights for this optimizer step, and their integer values."""

    quantized: QuantTensor  # what `module.quant_weight()` returns, autograd graph included
    codes: torch.Tensor  # round(value / scale + zero point), detached; any dtype that holds integers exactly


def flat_quantizable(module: QuantConv2d) -> bool:
    """Whether `module`'s weight quantizer is the configuration `quantize_flat` replays exactly."""
    proxy = module.weight_quant
    tensor_quant = getattr(proxy, "tensor_quant", None)
    if not (proxy.is_quant_enabled and not proxy.export_mode and isinstance(tensor_quant, RescalingIntQuant)):
        return False
    int_quant, scaling = tensor_quant.int_quant, tensor_quant.scaling_impl
    if not isinstance(scaling, ParameterFromStatsFromParameterScaling):
        return False
    scale, weight = scaling.value, module.weight
    return (
        type(int_quant.float_to_int_impl) is RoundSte
        and type(int_quant.tensor_clamp_impl) is TensorClamp
        and type(int_quant.input_view_impl) is Identity
        and type(int_quant.delay_wrapper.delay_impl) is _NoDelay
        and type(tensor_quant.zero_point_impl) is ZeroZeroPoint
        # A constant bit width (a learned one would need the clamp's gradient to it) and float scales.
        and type(tensor_quant.msb_clamp_bit_width_impl) is BitWidthConst
        and type(tensor_quant.int_scaling_impl) is IntScaling
        and type(scaling.stats_scaling_impl.restrict_clamp_scaling.restrict_value_impl) is FloatRestrictValue
        and scaling.init_done
        and not scaling.local_loss_mode
        and not tensor_quant.observer_only
        # One scale per conv, or one per output channel laid out along dim 0.
        and (scale.numel() == 1 or tuple(scale.shape) == (weight.shape[0],) + (1,) * (weight.dim() - 1))
        and scale.dtype == weight.dtype
    )


def group_key(module: QuantConv2d) -> tuple:
    """Layers that can be quantized in one pass: the same quantizer modules (types, bit width, signedness, range,
    scale floor), on the same device and dtype. `quantize_flat` applies the first layer's scale chain to all."""
    tensor_quant = module.weight_quant.tensor_quant
    clamp = tensor_quant.scaling_impl.stats_scaling_impl.restrict_clamp_scaling.clamp_ste
    return (
        tuple(type(submodule) for submodule in tensor_quant.modules()),
        float(tensor_quant.msb_clamp_bit_width_impl()), tensor_quant.int_quant.signed,
        tensor_quant.int_quant.narrow_range, getattr(clamp, "min_val", None),
        module.weight.device, module.weight.dtype,
    )


class _FlatIntFakeQuant(torch.autograd.Function):
    """q = clamp(round(w / s), lo, hi); out = q * s, on flat weights with one scale per row of `rows`.

    The backward computes what autograd computes through Brevitas' ops, in the same order: the clamp and
    straight-through round pass G = mask * (g * s) to w / s, so dw = G / s; the scale gets g * q from the
    rescale and -G * ((w / s) / s) from the division, each summed over its row, then added.
    """

    @staticmethod
    def forward(ctx, weights, row_scales, rows, low, high):
        # Each row's scale written over its weights in place (no index tensor, unlike repeat_interleave).
        scales = torch.empty_like(weights)
        start = 0
        for scale, (count, length) in zip(row_scales.split([count for count, _ in rows]), rows):
            end = start + count * length
            scales[start:end].view(count, length).copy_(scale.view(count, 1).expand(count, length))
            start = end
        ratios = weights / scales
        rounded = torch.round(ratios)
        codes = torch.clamp(rounded, low, high)
        ctx.save_for_backward(scales, ratios, codes, codes == rounded)
        ctx.rows = rows
        ctx.mark_non_differentiable(codes)
        return codes * scales, codes

    @staticmethod
    @once_differentiable  # a double backward through this would silently miss terms
    def backward(ctx, grad_out, _grad_codes):
        scales, ratios, codes, inside = ctx.saved_tensors
        grad_ratio = torch.where(inside, grad_out * scales, 0.0)
        from_rescale = grad_out * codes
        from_division = -grad_ratio * (ratios / scales)
        sums, start = [], 0
        for count, length in ctx.rows:
            end = start + count * length
            sums.append(from_rescale[start:end].view(count, length).sum(1)
                        + from_division[start:end].view(count, length).sum(1))
            start = end
        return grad_ratio / scales, torch.cat(sums), None, None, None


def quantize_flat(modules: Sequence[QuantConv2d]) -> list[StepWeights]:
    """The fake-quantized weights of `modules` (one `group_key`, all `flat_quantizable`), in one pass."""
    first = modules[0].weight_quant.tensor_quant
    bit_width = first.msb_clamp_bit_width_impl()
    scaling = first.scaling_impl
    stats_scaling = scaling.stats_scaling_impl
    # Brevitas' own chain, applied to every layer's scale parameters at once (elementwise).
    threshold = stats_scaling.restrict_clamp_threshold(scaling.restrict_threshold_pre(first.int_scaling_impl(bit_width)))
    parameters = [m.weight_quant.tensor_quant.scaling_impl.value for m in modules]
    row_scales = stats_scaling.restrict_clamp_scale_threshold(
        stats_scaling.restrict_clamp_scaling(torch.cat([p.reshape(-1) for p in parameters])) / threshold
    )
    rows = [(p.numel(), m.weight.numel() // p.numel()) for p, m in zip(parameters, modules)]
    weights = torch.cat([m.weight.reshape(-1) for m in modules])
    low, high = float(first.int_quant.min_int(bit_width)), float(first.int_quant.max_int(bit_width))
    values, codes = _FlatIntFakeQuant.apply(weights, row_scales, rows, low, high)
    zero_point = first.zero_point_impl(weights, row_scales, bit_width)
    sizes = [m.weight.numel() for m in modules]
    return [
        StepWeights(
            IntQuantTensor(value.view_as(m.weight), scale.view_as(p), zero_point, bit_width,
                           m.weight_quant.is_signed, m.weight_quant.training),
            layer_codes.view_as(m.weight),
        )
        for m, p, value, scale, layer_codes in zip(
            modules, parameters, values.split(sizes), row_scales.split([p.numel() for p in parameters]),
            codes.split(sizes),
        )
    ]
