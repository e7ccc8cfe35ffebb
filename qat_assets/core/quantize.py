"""The W4A16 transform: fake-quantized conv weights (Brevitas), float activations.

Every trainable `nn.Conv2d` of an Ultralytics detection model is swapped, in place, for a Brevitas
`QuantConv2d` holding the same weights and bias, so the transformed model equals the float model up to
quantization error. Weights are symmetric, narrow-range integers with one scale per output channel (or, optionally, one per
conv as in Brevitas' default layerwise transform);
inputs, outputs and biases stay float. The first conv and the detection-head output convs can be kept at
8 bit (the usual QAT recipe). The DFL conv is never quantized: it holds the fixed integral 0..15 and is
not trained, and quantizing it costs a lot of mAP (see research.md).

Learned scales are LSQ-style: a trainable per-channel scale parameter, initialised from the max-abs of
the copied float weights during the transform (so it is in the state dict from the start and a freshly
transformed model loads a saved one strictly). By default they train with the weights' optimizer; with
`lsq_scales` the trainer gives them LSQ's gradient scale and their own optimizer (`learned_scales`). Statistics-based scales are recomputed from the latent
weights on every forward and have no state of their own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from brevitas.core.scaling import ParameterFromStatsFromParameterScaling
from brevitas.inject.enum import ScalingImplType
from brevitas.nn import QuantConv2d
from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
from brevitas.quant_tensor import QuantTensor
from torch import nn

from qat_assets.core.flat_weight_quant import (
    FlatQuantWorkspace,
    StepWeights,
    flat_quantizable,
    group_key,
    quantize_flat,
    quantizer_constants,
)

DFL_REASON = "fixed DFL integral, not trained"
FIRST_CONV_REASON = "first conv kept at 8 bit"
HEAD_OUTPUT_REASON = "detection-head output conv kept at 8 bit"
BODY_REASON = "weight-only fake quantization"
HEAD_BRANCHES = ("cv2", "cv3", "one2one_cv2", "one2one_cv3")


@dataclass(frozen=True)
class QuantOptions:
    weight_bit_width: int = 4
    keep_first_last_8bit: bool = True
    learned_scales: bool = True
    # False: one scale per conv, as Brevitas' default layerwise transform gives (the seed report's run).
    per_channel_scales: bool = True


@dataclass
class LayerQuantization:
    name: str
    bit_width: int | None  # None: left in float
    reason: str
    out_channels: int


@dataclass
class QuantizationReport:
    options: QuantOptions
    layers: list[LayerQuantization] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of convs per precision, e.g. {"w4": 80, "w8": 13, "float": 1}."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            key = "float" if layer.bit_width is None else f"w{layer.bit_width}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_rows(self) -> list[dict]:
        return [asdict(layer) for layer in self.layers]

    def to_dict(self) -> dict:
        return {"options": asdict(self.options), "layers": self.to_rows()}

    @classmethod
    def from_dict(cls, payload: dict) -> QuantizationReport:
        return cls(
            options=QuantOptions(**payload["options"]),
            layers=[LayerQuantization(**row) for row in payload["layers"]],
        )


def weight_quantizer(bit_width: int, learned_scales: bool, per_channel_scales: bool = True):
    """Brevitas injector: narrow-range signed int, float scale(s) from max-abs stats, per output channel or per tensor."""
    scaling = ScalingImplType.PARAMETER_FROM_STATS if learned_scales else ScalingImplType.STATS
    base = Int8WeightPerChannelFloat if per_channel_scales else Int8WeightPerTensorFloat
    return base.let(bit_width=bit_width, scaling_impl_type=scaling)


def _precision_plan(model: nn.Module, options: QuantOptions) -> dict[int, tuple[int | None, str]]:
    """Map id(conv) -> (bit width or None, reason) for the convs that do not get the default bit width."""
    plan: dict[int, tuple[int | None, str]] = {}
    head = model.model[-1]
    if options.keep_first_last_8bit:
        first_conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
        plan[id(first_conv)] = (8, FIRST_CONV_REASON)
        for branch_name in HEAD_BRANCHES:
            for branch in getattr(head, branch_name, ()):
                plan[id(branch[-1])] = (8, HEAD_OUTPUT_REASON)
    if hasattr(head, "dfl"):
        plan[id(head.dfl.conv)] = (None, DFL_REASON)
    return plan


def _conv_geometry(conv: nn.Conv2d) -> dict:
    """Constructor arguments that rebuild `conv`'s shape, placement and dtype (float or quantized)."""
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def no_autocast(device_type: str):
    """Autocast off for the quantizer's arithmetic, whatever the caller's.

    Under AMP (`amp` setting) Ultralytics runs the training forward inside `torch.autocast`. The fake-quantized
    weights must still be the fp32 grid values: autocast would run any of the quantizer's ops on its
    lower-precision list (matmul-like ops today; Brevitas' chain uses only elementwise ones, which keep fp32,
    but that is an accident of its current code) in bf16/fp16, moving the scale or the rounding boundaries.
    The conv then casts the finished fp32 weights to the autocast dtype itself, as it does any float weight.
    """
    return torch.autocast(device_type, enabled=False)


class StepQuantConv2d(QuantConv2d):
    """Brevitas' QuantConv2d for weight-only quantization, whose fake-quantized weights can be reused within a step.

    Two things differ from the parent, neither changes a number (tests compare outputs and gradients bit
    for bit):
    - `prepare_step_weights` quantizes every layer's weights once after an optimizer step (for the
      oscillation tracker; all layers in one pass, flat_weight_quant.py) and the next forward reuses that result, autograd graph included, instead of
      quantizing the same weights again. The reuse is checked against the version counters of the
      weights and quantizer parameters, so any change in between (a second optimizer step, a
      `load_state_dict`) falls back to quantizing afresh; a prepared result is used at most once, because
      its graph is freed by the backward pass it joins.
    - With float input and no input/output/bias quantizer (W4A16), the forward is the conv of the input
      with Brevitas' fake-quantized weights, called directly: Brevitas' generic layer path (input and
      output proxies, QuantTensor dispatch of the conv) computes exactly that with more Python per call.
      Anything else (export mode, a QuantTensor input, activation quantizers) takes Brevitas' own path.
    """

    _prepared: tuple[QuantTensor, tuple] | None = None
    _parameter_holders: tuple[nn.Module, list[nn.Module]] | None = None

    def _weight_versions(self) -> tuple:
        # `_version` counts in-place changes; `.to()`/`.half()` swap the storage without bumping it, hence
        # the pointer, device and dtype. Not the autocast state: the quantizer never runs under autocast
        # (`quant_weight`), so a result prepared after the optimizer step serves the next forward under AMP too.
        weight = self.weight
        return (self.training, torch.is_grad_enabled(),
                weight._version, weight.data_ptr(), weight.device, weight.dtype,
                *((p._version, p.data_ptr()) for p in self._quantizer_parameters()))

    def _quantizer_parameters(self) -> list[torch.Tensor]:
        # Walking the quantizer's ~25 submodules for their parameters cost ~0.1 ms per layer, twice per step:
        # the modules that hold parameters are remembered, their parameters read afresh. A rebuilt quantizer
        # (Brevitas' init_tensor_quant) is a new tensor_quant object and is walked again.
        tensor_quant = self.weight_quant.tensor_quant
        if self._parameter_holders is None or self._parameter_holders[0] is not tensor_quant:
            holders = [module for module in self.weight_quant.modules() if module._parameters]
            self._parameter_holders = (tensor_quant, holders)
        return [p for module in self._parameter_holders[1] for p in module._parameters.values() if p is not None]

    def quant_weight(self, *args, **kwargs) -> QuantTensor:
        """Brevitas' fake-quantized weights, computed in the weights' dtype even under autocast (see `no_autocast`)."""
        with no_autocast(self.weight.device.type):
            return super().quant_weight(*args, **kwargs)

    def prepare_quant_weight(self, quantized: QuantTensor | None = None) -> QuantTensor:
        """Quantize the weights now (or take `quantized`, computed by `quantize_flat` with other layers'), for
        whoever needs them before the next forward, and keep them for it."""
        if quantized is None:
            quantized = self.quant_weight()
        self._prepared = (quantized, self._weight_versions())
        return quantized

    def _take_quant_weight(self) -> QuantTensor:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[1] == self._weight_versions():
            return prepared[0]
        return self.quant_weight()

    def _plain_float_forward(self, x) -> bool:
        return not (self.export_mode or isinstance(x, QuantTensor) or self.return_quant_tensor
                    or self.is_same_padded_strided
                    or self.input_quant.is_quant_enabled or self.output_quant.is_quant_enabled
                    or self.bias_quant.is_quant_enabled)

    def forward(self, x):
        if not self._plain_float_forward(x):
            self._prepared = None
            return super().forward(x)
        return self._conv_forward(x, self._take_quant_weight().value, self.bias)

    def __getstate__(self):
        # A prepared result carries an autograd graph, which neither deep-copies nor pickles; the quantizer's
        # parameter holders are found again in the copy.
        state = super().__getstate__()
        state.pop("_prepared", None)
        state.pop("_parameter_holders", None)
        return state


@torch.no_grad()
def integer_codes(quantized: QuantTensor) -> torch.Tensor:
    """int32 codes of a fake-quantized tensor: round(value / scale + zero point), as Brevitas' `int()` computes."""
    return torch.round(quantized.value / quantized.scale + quantized.zero_point).to(torch.int32)


@torch.enable_grad()  # the next training forward back-propagates through these
def prepare_step_weights(
    model: nn.Module, workspaces: dict[tuple, FlatQuantWorkspace] | None = None
) -> dict[str, StepWeights]:
    """Every quantized conv's fake-quantized weights and integer codes, computed once; a StepQuantConv2d's next
    forward reuses them. Layers whose quantizer `quantize_flat` replays are quantized together, per `group_key`;
    the others by Brevitas, one by one. Pass the same `workspaces` dict every step to reuse each group's
    buffers (`FlatQuantWorkspace`); the codes are then valid until the next call."""
    prepared = quantize_all(model, workspaces)
    for name, module in quantized_modules(model):
        if isinstance(module, StepQuantConv2d):
            module.prepare_quant_weight(prepared[name].quantized)
    return prepared


def quantize_all(model: nn.Module, workspaces: dict[tuple, FlatQuantWorkspace] | None = None) -> dict[str, StepWeights]:
    """Every quantized conv's fake-quantized weights and integer codes under the current scales, keyed by layer
    name: the layers `quantize_flat` replays in one pass per `group_key`, the others by Brevitas. With autograd
    as the caller has it enabled; nothing is kept on the modules (see `prepare_step_weights` for that)."""
    modules = quantized_modules(model)
    device_type = modules[0][1].weight.device.type if modules else "cpu"
    with no_autocast(device_type):  # fp32 grid values under AMP too
        groups: dict[tuple, list[tuple[str, StepQuantConv2d]]] = {}
        for name, module in modules:
            if isinstance(module, StepQuantConv2d) and flat_quantizable(module):
                groups.setdefault(group_key(module), []).append((name, module))
        quantized: dict[str, StepWeights] = {}
        for key, members in groups.items():
            workspace = None if workspaces is None else workspaces.setdefault(
                (key, tuple(name for name, _ in members)), FlatQuantWorkspace()
            )
            for (name, _), weights in zip(members, quantize_flat([module for _, module in members], workspace)):
                quantized[name] = weights
        for name, module in modules:
            if name not in quantized:
                weights = module.quant_weight()
                quantized[name] = StepWeights(weights, integer_codes(weights), quantizer_constants(module).bit_width)
        return {name: quantized[name] for name, _ in modules}


@dataclass(frozen=True)
class LearnedScale:
    """One learned weight-scale parameter of a quantized conv, with what LSQ's gradient scale needs.

    Brevitas' parameter holds the clipping threshold t = Q_p * s (s the step size LSQ learns; Q_p = 7 at 4
    bits, narrow range), so its gradient is dL/dt = dL/ds / Q_p: LSQ's step gradient (Esser et al. 2020, eq. 3)
    up to that constant per layer. LSQ scales the gradient of the step by g = 1 / sqrt(N * Q_p), N the number
    of weights the step quantizes (a whole layer in the paper; one output channel with per-channel scales).
    """

    name: str  # the parameter's name in the model
    parameter: nn.Parameter
    weights_per_scale: int  # N
    max_int: int  # Q_p

    @property
    def lsq_gradient_factor(self) -> float:
        return 1.0 / math.sqrt(self.weights_per_scale * self.max_int)


def learned_scales(model: nn.Module) -> list[LearnedScale]:
    """Every learned weight scale of the model's quantized convs (none under statistics scales)."""
    scales = []
    for name, module in quantized_modules(model):
        tensor_quant = getattr(module.weight_quant, "tensor_quant", None)
        scaling = getattr(tensor_quant, "scaling_impl", None)
        if not isinstance(scaling, ParameterFromStatsFromParameterScaling):
            continue
        parameter = scaling.value
        bit_width = tensor_quant.msb_clamp_bit_width_impl()
        [parameter_name] = [f"{name}.{local}" for local, p in module.named_parameters() if p is parameter]
        scales.append(LearnedScale(parameter_name, parameter, module.weight.numel() // parameter.numel(),
                                   int(tensor_quant.int_quant.max_int(bit_width))))
    return scales


@torch.no_grad()
def scale_lsq_gradients(scales: list[LearnedScale]) -> None:
    """Multiply each learned scale's gradient by LSQ's g, in place (call between backward and the optimizer step)."""
    for scale in scales:
        if scale.parameter.grad is not None:
            scale.parameter.grad.mul_(scale.lsq_gradient_factor)


def _quant_conv_like(conv: nn.Conv2d, bit_width: int, options: QuantOptions) -> QuantConv2d:
    quantizer = weight_quantizer(bit_width, options.learned_scales, options.per_channel_scales)
    quant_conv = StepQuantConv2d(**_conv_geometry(conv), weight_quant=quantizer)
    with torch.no_grad():
        quant_conv.weight.copy_(conv.weight)
        if conv.bias is not None:
            quant_conv.bias.copy_(conv.bias)
        # Initialise a learned scale from these weights now rather than on the first training forward,
        # so the scale is part of the state dict immediately.
        quant_conv.quant_weight()
    # Bit width and integer range read now, once, as Python numbers: the training step then reads no tensor.
    quantizer_constants(quant_conv)
    return quant_conv


def quantize_w4a16(model: nn.Module, options: QuantOptions) -> QuantizationReport:
    """Swap every trainable conv of an Ultralytics detection model for a fake-quantized one, in place."""
    if quantized_modules(model):
        raise ValueError("model is already quantized; build a fresh float model to transform")
    plan = _precision_plan(model, options)
    report = QuantizationReport(options=options)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        bit_width, reason = plan.get(id(module), (options.weight_bit_width, BODY_REASON))
        if not module.weight.requires_grad and bit_width is not None:
            bit_width, reason = None, "frozen weights, not trained"
        report.layers.append(LayerQuantization(name, bit_width, reason, module.out_channels))
        if bit_width is not None:
            _replace_module(model, name, _quant_conv_like(module, bit_width, options))
    return report


def _replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantConv2d]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantConv2d)]


@torch.no_grad()
def integer_weights(module: QuantConv2d) -> torch.Tensor:
    """The integer codes of a quantized conv's weights under its current scales."""
    return module.quant_weight().int()


@torch.no_grad()
def freeze_quantized_weights(model: nn.Module, quantized: Mapping[str, StepWeights] | None = None) -> nn.Module:
    """Deep copy of `model` with every QuantConv2d replaced by a plain conv holding its fake-quantized weights.

    Same outputs, none of the per-forward quantizer work: for evaluation and QC, where weights do not change.
    Plain convs also survive Ultralytics' conv+BN fusing, which would silently drop a QuantConv2d's quantizer.
    `quantized`: the weights as `quantize_all(model)` gave them, when the caller has them already.
    """
    # All layers quantized in one flat pass (bit-identical to Brevitas' layer by layer, several times faster).
    quantized = quantize_all(model) if quantized is None else quantized
    # The plain convs stand in for the quantized ones during the copy itself (deepcopy's memo), so the Brevitas
    # quantizers, most of the time of a QAT model's deep copy, are never copied: this runs at every validation.
    memo: dict[int, nn.Module] = {}
    for name, module in quantized_modules(model):
        conv = nn.Conv2d(**_conv_geometry(module))
        conv.weight.copy_(quantized[name].quantized.value)
        if module.bias is not None:
            conv.bias.copy_(module.bias)
        conv.requires_grad_(module.weight.requires_grad)
        conv.train(module.training)
        memo[id(module)] = conv
    return copy.deepcopy(model, memo)
