"""Known answers for EMA and PTQ, the two model transforms whose right result follows from their definition.

EMA: with the decay ramp d_i = decay * (1 - exp(-i / tau)) of Ultralytics' ModelEMA (the averaging the QAT trainer
uses), a copy that starts at A while the weights jump to B and stay there is B + (A - B) * prod(d_i); a constant
trajectory is therefore its own average. PTQ: a weight lands within half a quantization step of itself, so at 8 bits
the model barely moves; and weights already on the grid quantize to themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
from ultralytics.utils.torch_utils import ModelEMA

from qat_assets.core.models import build_detection_model
from qat_assets.core.quantize import QuantOptions, freeze_quantized_weights, quantize_w4a16, quantized_modules
from qat_assets.core.trainer import ema_schedule
from qat_assets_tests.core.test_quantize import head_tensors


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries ModelEMA averages: every floating-point tensor of the state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def quantized_yolo(options: QuantOptions) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detection_model("yolo10n", ["a", "b", "c"])
    quantize_w4a16(model, options)
    return model


def test_ema_of_a_constant_trajectory_is_that_trajectory():
    model = quantized_yolo(QuantOptions())
    schedule = ema_schedule(0.9999, None, total_updates=400, updates_per_epoch=20)
    ema = ModelEMA(model, decay=schedule["decay"], tau=schedule["tau"])
    for _ in range(25):
        ema.update(model)
    live, averaged = float_state(model), float_state(ema.ema)
    assert all(torch.allclose(averaged[k], live[k], rtol=1e-6, atol=1e-7) for k in live)


def test_ema_after_a_step_change_follows_its_closed_form():
    model = quantized_yolo(QuantOptions())  # learned scales: they are averaged too
    schedule = ema_schedule(0.9999, 1.0, total_updates=2000, updates_per_epoch=100)  # decay 0.99, a short ramp
    ema = ModelEMA(model, decay=schedule["decay"], tau=schedule["tau"])
    start = float_state(model)
    with torch.no_grad():  # the weights jump once to B = A + 1, then stay
        for p in model.parameters():
            p.add_(1.0)
    jumped = float_state(model)
    updates = 10
    for _ in range(updates):
        ema.update(model)
    kept = math.prod(schedule["decay"] * (1 - math.exp(-i / schedule["tau"])) for i in range(1, updates + 1))
    assert 0.05 < kept < 0.95  # the answer is neither the start nor the end
    averaged = float_state(ema.ema)
    parameters = {name for name, _ in model.named_parameters()}
    for name in parameters:
        expected = jumped[name] + (start[name] - jumped[name]) * kept
        assert torch.allclose(averaged[name], expected, rtol=1e-5, atol=1e-5), name
    assert "model.2.cv1.conv.weight_quant.tensor_quant.scaling_impl.value" in parameters


def head_inputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The three feature maps the detection head receives, flattened: the whole backbone and neck's output.

    (The decoded predictions would hide the error: box coordinates in pixels dominate their norm.)
    """
    seen = []
    hook = model.model[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        hook.remove()
    return torch.cat([feature.flatten() for feature in seen[0]])


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_ptq_at_8_bits_keeps_every_weight_within_half_a_step_and_the_features_close(per_channel, images):
    torch.manual_seed(0)
    float_model = build_detection_model("yolo10n", ["a", "b", "c"]).eval()
    reference = head_inputs(float_model, images)
    errors = {}
    for bits in (8, 4):
        model = build_detection_model("yolo10n", ["a", "b", "c"])
        model.load_state_dict(float_model.state_dict())
        quantize_w4a16(model, QuantOptions(weight_bit_width=bits, keep_first_last_8bit=False,
                                           learned_scales=False, per_channel_scales=per_channel))
        for name, module in quantized_modules(model):
            quant = module.quant_weight()
            # Round to nearest: at most half a step, up to float32 rounding of the scale arithmetic.
            assert ((quant.value - module.weight).abs() <= quant.scale / 2 * (1 + 1e-4)).all(), name
        errors[bits] = float((head_inputs(model, images) - reference).norm() / reference.norm())
    # Four bits fewer: a step 16x as large. Measured (random-init yolov10n, 64 px): 0.011 at 8 bits, 0.19-0.21 at 4.
    assert errors[8] < 0.02 and errors[8] < errors[4] / 8, errors


@pytest.mark.parametrize("learned", [True, False], ids=["learned", "statistics"])
def test_ptq_of_weights_already_on_the_grid_is_the_identity(learned, images):
    options = QuantOptions(learned_scales=learned)
    once = freeze_quantized_weights(quantized_yolo(options)).eval()  # plain convs holding the W4/W8 values
    twice = build_detection_model("yolo10n", ["a", "b", "c"])
    twice.load_state_dict(once.state_dict())
    quantize_w4a16(twice, options)
    for name, module in quantized_modules(twice):
        assert torch.allclose(module.quant_weight().value, once.get_submodule(name).weight, rtol=0, atol=1e-6), name
    assert torch.allclose(head_tensors(twice.eval(), images), head_tensors(once, images), rtol=1e-5, atol=1e-5)
