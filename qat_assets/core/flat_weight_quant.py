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

import weakref
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
    # round(value / scale + zero point), detached; any dtype that holds integers exactly. From `quantize_flat`,
    # a view of its workspace: read it before the next `quantize_flat` of the same layers.
    codes: torch.Tensor
    bit_width: int  # `quantized.bit_width` as a Python int (`quantizer_constants`): reading the tensor is a host sync


class QuantizerConstants(NamedTuple):
    """What a weight quantizer fixes when it is built, as Python values.

    Why: Brevitas keeps the bit width as a tensor on the layer's device, so every `float(bit_width)` in the
    training step was a host sync on a GPU, two per layer per step. These are read once per quantizer.
    """

    bit_width: int
    min_int: float | None  # the integer range (None for a quantizer `quantize_flat` does not replay)
    max_int: float | None


# Keyed by the quantizer object itself: a quantizer Brevitas rebuilds (`init_tensor_quant`) or a deep copy is a
# new object, read once again; an entry goes with its quantizer.
_CONSTANTS: weakref.WeakKeyDictionary[torch.nn.Module, QuantizerConstants] = weakref.WeakKeyDictionary()


def quantizer_constants(module: QuantConv2d) -> QuantizerConstants:
    """`module`'s weight bit width and integer range, read from its quantizer's tensors on the first call for
    that quantizer (a host sync per layer, at build time: `quantize_w4a16` calls this) and cached after."""
    tensor_quant = module.weight_quant.tensor_quant
    constants = _CONSTANTS.get(tensor_quant)
    if constants is None:
        if isinstance(tensor_quant, RescalingIntQuant):
            bit_width = tensor_quant.msb_clamp_bit_width_impl()
            int_quant = tensor_quant.int_quant
            constants = QuantizerConstants(int(bit_width), float(int_quant.min_int(bit_width)),
                                           float(int_quant.max_int(bit_width)))
        else:
            constants = QuantizerConstants(int(module.weight_quant.bit_width()), None, None)
        _CONSTANTS[tensor_quant] = constants
    return constants


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
    scale floor), on the same device and dtype. `quantize_flat` applies the first layer's scale chain to all.
    Python values only (no host sync)."""
    tensor_quant = module.weight_quant.tensor_quant
    clamp = tensor_quant.scaling_impl.stats_scaling_impl.restrict_clamp_scaling.clamp_ste
    return (
        tuple(type(submodule) for submodule in tensor_quant.modules()),
        quantizer_constants(module).bit_width, tensor_quant.int_quant.signed,
        tensor_quant.int_quant.narrow_range, getattr(clamp, "min_val", None),
        module.weight.device, module.weight.dtype,
    )


class FlatQuantWorkspace:
    """The buffers one group's `quantize_flat` writes its intermediates into, kept from one step to the next.

    Why: on the CPU every new tensor of a group's size (10.6 MB for yolov10n's 4-bit convs) is fresh memory
    from the OS, and writing it page-faults. An elementwise op into a new tensor took about twice as long as
    the same op into an existing one, and a dozen such ops per step were most of QAT's cost over FP
    (benchmarks/bench_qat.py). Reuse is safe under autograd's version counters: a backward through a step
    whose saved buffers a later `quantize_flat` overwrote fails with PyTorch's "modified by an inplace
    operation" error instead of using the new values. The integer codes handed out (`StepWeights.codes`) are
    views of `codes`: valid until the next `quantize_flat` with this workspace.
    """

    def __init__(self) -> None:
        self.scratch = self.scales = self.ratios = self.codes = self.outside = None

    def fit(self, like: torch.Tensor, numel: int) -> None:
        """(Re)allocate the buffers for `numel` elements of `like`'s device and dtype, unless they fit already."""
        current = self.scratch
        if current is None or current.numel() != numel or current.device != like.device or current.dtype != like.dtype:
            self.scratch, self.scales, self.ratios, self.codes = (
                torch.empty(numel, device=like.device, dtype=like.dtype) for _ in range(4)
            )
            self.outside = torch.empty(numel, device=like.device, dtype=torch.bool)


class _FlatIntFakeQuant(torch.autograd.Function):
    """q = clamp(round(w / s), lo, hi); out = q * s, over the concatenated weights `*weights`, one scale per row
    of `rows`. The integer codes q are left in `workspace.codes`.

    The backward computes what autograd computes through Brevitas' ops, in the same order: the clamp and
    straight-through round pass G = mask * (g * s) to w / s, so dw = G / s; the scale gets g * q from the
    rescale and -G * ((w / s) / s) from the division, each summed over its row, then added (here as a
    difference of sums, which is exact: negation commutes with rounding).
    Only the output and the weights' gradient are new tensors; every intermediate is a workspace buffer.
    """

    @staticmethod
    def forward(ctx, row_scales, rows, low, high, workspace, *weights):
        workspace.fit(weights[0], sum(count * length for count, length in rows))
        scratch, scales, ratios, codes, outside = (
            workspace.scratch, workspace.scales, workspace.ratios, workspace.codes, workspace.outside
        )
        torch.cat([weight.reshape(-1) for weight in weights], out=scratch)
        # Each row's scale written over its weights in place (no index tensor, unlike repeat_interleave).
        start = 0
        for scale, (count, length) in zip(row_scales.split([count for count, _ in rows]), rows):
            end = start + count * length
            scales[start:end].view(count, length).copy_(scale.view(count, 1).expand(count, length))
            start = end
        torch.div(scratch, scales, out=ratios)
        torch.round(ratios, out=scratch)  # the weights are no longer needed: scratch holds round(w / s)
        torch.clamp(scratch, low, high, out=codes)
        torch.ne(codes, scratch, out=outside)  # where the clamp changed the rounded value
        ctx.save_for_backward(scales, ratios, codes, outside)
        ctx.rows, ctx.scratch, ctx.shapes = rows, scratch, [weight.shape for weight in weights]
        return codes * scales

    @staticmethod
    @once_differentiable  # a double backward through this would silently miss terms
    def backward(ctx, grad_out):
        scales, ratios, codes, outside = ctx.saved_tensors
        scratch = ctx.scratch  # this step's, even if the workspace was refitted to other layers since
        grad_ratio = (grad_out * scales).masked_fill_(outside, 0.0)
        from_rescale = torch.mul(grad_out, codes, out=scratch)
        rescale_sums = _row_sums(from_rescale, ctx.rows)
        division_terms = torch.div(ratios, scales, out=scratch).mul_(grad_ratio)
        division_sums = _row_sums(division_terms, ctx.rows)
        grad_weights = grad_ratio.div_(scales).split([shape.numel() for shape in ctx.shapes])
        return (
            torch.cat(rescale_sums) - torch.cat(division_sums), None, None, None, None,
            *(part.view(shape) for part, shape in zip(grad_weights, ctx.shapes)),
        )


def _row_sums(values: torch.Tensor, rows: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    sums, start = [], 0
    for count, length in rows:
        end = start + count * length
        sums.append(values[start:end].view(count, length).sum(1))
        start = end
    return sums


def quantize_flat(modules: Sequence[QuantConv2d], workspace: FlatQuantWorkspace | None = None) -> list[StepWeights]:
    """The fake-quantized weights of `modules` (one `group_key`, all `flat_quantizable`), in one pass.

    With a `workspace` kept from the last call for the same group, the intermediates reuse its buffers.
    """
    workspace = FlatQuantWorkspace() if workspace is None else workspace
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
    constants = quantizer_constants(modules[0])  # Python numbers: the clamp's bounds need no host sync
    low, high = constants.min_int, constants.max_int
    values = _FlatIntFakeQuant.apply(row_scales, rows, low, high, workspace, *(m.weight for m in modules))
    zero_point = first.zero_point_impl(values, row_scales, bit_width)
    sizes = [m.weight.numel() for m in modules]
    return [
        StepWeights(
            IntQuantTensor(value.view_as(m.weight), scale.view_as(p), zero_point, bit_width,
                           m.weight_quant.is_signed, m.weight_quant.training),
            layer_codes.view_as(m.weight), constants.bit_width,
        )
        for m, p, value, scale, layer_codes in zip(
            modules, parameters, values.split(sizes), row_scales.split([p.numel() for p in parameters]),
            workspace.codes.split(sizes),
        )
    ]
