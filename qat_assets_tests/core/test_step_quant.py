"""Weights quantized once per optimizer step (StepQuantConv2d) give the same QAT as Brevitas' own layer path.

The reference is the same model with every StepQuantConv2d turned back into Brevitas' QuantConv2d (same
attributes, parent class), trained the old way: Brevitas' forward, and the oscillation tracker fed from
an extra `quant_weight().int()` pass after each optimizer step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from brevitas.nn import QuantConv2d
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.oscillation import OscillationTracker
from qat_assets.core.quantize import QuantOptions, StepQuantConv2d, quantize_w4a16, quantized_modules

STEPS = 6


def quantized_model(options: QuantOptions) -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    quantize_w4a16(model, options)
    return model


def brevitas_path_copy(model: DetectionModel) -> DetectionModel:
    reference = copy.deepcopy(model)
    for _, module in quantized_modules(reference):
        assert type(module) is StepQuantConv2d
        module.__class__ = QuantConv2d
    return reference


def batch(images: int = 2, imgsz: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    boxes = 3 * images
    return {
        "img": torch.rand(images, 3, imgsz, imgsz, generator=generator),
        "cls": torch.randint(0, 3, (boxes, 1), generator=generator).float(),
        "bboxes": torch.cat([torch.rand(boxes, 2, generator=generator) * 0.6 + 0.2,
                             torch.rand(boxes, 2, generator=generator) * 0.2 + 0.1], dim=1),
        "batch_idx": torch.arange(images).repeat_interleave(3).float(),
    }


@torch.no_grad()
def old_tracker_update(tracker: OscillationTracker, model: DetectionModel) -> None:
    """The tracker's update before weights were shared with the forward: its own quant_weight() pass."""
    for name, module in quantized_modules(model):
        quantized = module.quant_weight()
        if float(quantized.bit_width) <= tracker.max_bit_width:
            tracker.update(name, quantized.int())


def train(model: DetectionModel, update_tracker) -> tuple[list[torch.Tensor], OscillationTracker]:
    model.train()
    # A large learning rate, so integer codes change (and flip back) within a few steps.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
    tracker = OscillationTracker(momentum=0.2, threshold=0.1)
    data = batch()
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.loss(data)
        loss.sum().backward()
        optimizer.step()
        update_tracker(tracker, model)
        losses.append(loss.detach().clone())
    return losses, tracker


@pytest.mark.parametrize("options", [QuantOptions(), QuantOptions(learned_scales=False)], ids=["learned", "statistics"])
def test_weights_quantized_once_per_step_train_bit_identically_to_brevitas_path(options):
    model = quantized_model(options)
    reference = brevitas_path_copy(model)
    start = {name: codes.clone() for name, codes in
             ((n, m.quant_weight().int()) for n, m in quantized_modules(model))}

    losses, tracker = train(model, lambda tracker, m: tracker.update_model(m))
    reference_losses, reference_tracker = train(reference, old_tracker_update)

    for loss, reference_loss in zip(losses, reference_losses, strict=True):
        assert torch.equal(loss, reference_loss)
    reference_state = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    assert tracker.state_dict().keys() == reference_tracker.state_dict().keys()
    for key, value in tracker.state_dict().items():
        reference_value = reference_tracker.state_dict()[key]
        assert (value == reference_value) if isinstance(value, float) else torch.equal(value, reference_value), key
    # The comparison means something: codes moved and some weights oscillated.
    assert any(not torch.equal(start[name], m.quant_weight().int()) for name, m in quantized_modules(model))
    assert tracker.oscillating_fraction() > 0


def test_a_prepared_result_is_not_reused_once_the_weights_changed():
    model = quantized_model(QuantOptions()).train()
    name, conv = next((n, m) for n, m in quantized_modules(model) if m.in_channels > 3)
    x = torch.rand(1, conv.in_channels, 8, 8)
    conv.prepare_quant_weight()
    with torch.no_grad():
        conv.weight.add_(0.5 * conv.weight.abs().max())  # e.g. an optimizer step after the preparation
    fresh = torch.nn.functional.conv2d(x, conv.quant_weight().value, conv.bias, conv.stride, conv.padding,
                                       conv.dilation, conv.groups)
    assert torch.equal(conv(x), fresh)
    # Used at most once: the next forward quantizes again (the first one's graph is gone after its backward).
    conv.prepare_quant_weight()
    conv(x).sum().backward()
    assert conv._prepared is None
    conv(x).sum().backward()


def test_a_prepared_result_is_not_reused_after_a_dtype_change():
    model = quantized_model(QuantOptions()).train()
    _, conv = next((n, m) for n, m in quantized_modules(model) if m.in_channels > 3)
    prepared = conv.prepare_quant_weight()
    conv.double()  # swaps the storage without bumping the version counter
    assert conv._take_quant_weight() is not prepared


def test_a_result_prepared_outside_autocast_serves_the_forward_under_autocast():
    """Under AMP the step's flat pass runs after the optimizer step, outside Ultralytics' autocast region, and
    the next forward inside it: the quantizer never runs under autocast, so the prepared fp32 grid is the one a
    fresh quantization there would give (test_quantize.py), and re-quantizing layer by layer would only cost time."""
    model = quantized_model(QuantOptions()).train()
    _, conv = next((n, m) for n, m in quantized_modules(model) if m.in_channels > 3)
    x = torch.rand(1, conv.in_channels, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = conv(x)
    prepared = conv.prepare_quant_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv._take_quant_weight() is prepared
        conv.prepare_quant_weight(prepared)
        reused = conv(x)
    assert reused.dtype == torch.bfloat16 and torch.equal(reused, fresh)


def test_a_model_with_prepared_weights_deep_copies():
    model = quantized_model(QuantOptions()).train()
    OscillationTracker().update_model(model)
    copied = copy.deepcopy(model)
    assert all(m._prepared is None for _, m in quantized_modules(copied))
    assert all(m._prepared is not None for _, m in quantized_modules(model))


def test_a_prepared_result_is_not_reused_after_a_quantizer_parameter_is_replaced():
    """The quantizer's parameter holders are remembered between steps; their parameters are read afresh."""
    model = quantized_model(QuantOptions()).train()
    _, conv = next((n, m) for n, m in quantized_modules(model) if m.in_channels > 3)
    prepared = conv.prepare_quant_weight()
    scaling = conv.weight_quant.tensor_quant.scaling_impl
    scaling.value = torch.nn.Parameter(scaling.value.detach() * 2)  # e.g. a user swapping in their own scales
    assert conv._take_quant_weight() is not prepared
