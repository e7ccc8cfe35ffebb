"""The W4A16 transform on a real Ultralytics YOLOv10n with real Brevitas quantizers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from brevitas.nn import QuantConv2d
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.quantize import (
    DFL_REASON,
    QuantizationReport,
    QuantOptions,
    freeze_quantized_weights,
    integer_weights,
    quantize_all,
    quantize_w4a16,
    quantized_modules,
)

OPTION_SETS = [QuantOptions(), QuantOptions(learned_scales=False)]


def build_float_model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov10n.yaml", nc=3, verbose=False).eval()


def head_tensors(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every raw tensor the eval-mode model returns (decoded predictions and per-level head outputs), flattened."""
    with torch.no_grad():
        output = model(images)
    flat: list[torch.Tensor] = []

    def collect(item) -> None:
        if isinstance(item, torch.Tensor):
            flat.append(item.flatten())
        elif isinstance(item, dict):
            for key in sorted(item):
                collect(item[key])
        elif isinstance(item, (list, tuple)):
            for element in item:
                collect(element)

    collect(output)
    return torch.cat(flat)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=OPTION_SETS, ids=["learned", "statistics"])
def transformed(request) -> tuple[QuantOptions, DetectionModel]:
    model = build_float_model()
    quantize_w4a16(model, request.param)
    return request.param, model


@pytest.fixture(scope="module")
def float_and_quantized() -> tuple[DetectionModel, DetectionModel, QuantizationReport]:
    float_model = build_float_model()
    quantized = copy.deepcopy(float_model)
    report = quantize_w4a16(quantized, QuantOptions())
    return float_model, quantized.eval(), report


def test_report_lists_every_conv_with_the_planned_precision(float_and_quantized):
    float_model, quantized, report = float_and_quantized
    float_convs = [name for name, module in float_model.named_modules() if isinstance(module, nn.Conv2d)]
    assert [layer.name for layer in report.layers] == float_convs
    by_name = {layer.name: layer for layer in report.layers}
    head = "model.23"
    head_outputs = [f"{head}.{branch}.{level}.2" for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3") for level in range(3)]
    assert by_name["model.0.conv"].bit_width == 8
    assert all(by_name[name].bit_width == 8 for name in head_outputs)
    assert by_name[f"{head}.dfl.conv"].bit_width is None and by_name[f"{head}.dfl.conv"].reason == DFL_REASON
    assert report.counts() == {"w8": 1 + len(head_outputs), "w4": len(float_convs) - 2 - len(head_outputs), "float": 1}
    assert by_name[f"{head}.cv3.0.2"].out_channels == 3


def test_modules_match_the_report_and_dfl_stays_float(float_and_quantized):
    _, quantized, report = float_and_quantized
    quantized_names = {name for name, _ in quantized_modules(quantized)}
    assert quantized_names == {layer.name for layer in report.layers if layer.bit_width is not None}
    dfl_conv = quantized.model[-1].dfl.conv
    assert type(dfl_conv) is nn.Conv2d and not dfl_conv.weight.requires_grad
    assert torch.equal(dfl_conv.weight.flatten(), torch.arange(16, dtype=torch.float32))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_w4a16(quantized, QuantOptions())


def test_all_convs_at_four_bit_without_first_last_exception():
    model = build_float_model()
    report = quantize_w4a16(model, QuantOptions(keep_first_last_8bit=False))
    assert report.counts() == {"w4": len(report.layers) - 1, "float": 1}


@pytest.mark.parametrize("learned_scales", [False, True])
def test_per_tensor_option_gives_one_scale_per_conv_set_by_its_largest_weight(learned_scales):
    model = build_float_model()
    options = QuantOptions(keep_first_last_8bit=False, learned_scales=learned_scales, per_channel_scales=False)
    report = quantize_w4a16(model, options)
    assert report.to_dict()["options"]["per_channel_scales"] is False
    for _, module in quantized_modules(model):
        quant_weight = module.quant_weight()
        assert quant_weight.scale.numel() == 1
        # max-abs statistics over the whole tensor: the largest weight lands on the top code, 7 at 4 bit
        assert torch.allclose(quant_weight.scale.flatten(), module.weight.detach().abs().max() / 7, rtol=1e-5)
        assert integer_weights(module).abs().max() == 7


def test_scales_are_per_output_channel_and_codes_fit_the_bit_width(float_and_quantized):
    _, quantized, report = float_and_quantized
    bits = {layer.name: layer.bit_width for layer in report.layers}
    for name, module in quantized_modules(quantized):
        quant_weight = module.quant_weight()
        assert quant_weight.scale.shape == (module.out_channels, 1, 1, 1)
        codes = integer_weights(module)
        limit = 2 ** (bits[name] - 1) - 1  # narrow range: -7..7 at 4 bit
        assert codes.abs().max() <= limit
        assert torch.allclose(codes.float() * quant_weight.scale, quant_weight.value, atol=1e-6)
    four_bit_codes = integer_weights(quantized.get_submodule("model.2.cv1.conv"))
    assert len(torch.unique(four_bit_codes)) > 8  # the scale uses the 4-bit range, not a sliver of it


def test_transformed_model_is_close_to_but_not_the_float_model(float_and_quantized, images):
    float_model, quantized, _ = float_and_quantized
    reference, approximation = head_tensors(float_model, images), head_tensors(quantized, images)
    assert not torch.equal(reference, approximation)
    relative_error = (approximation - reference).norm() / reference.norm()
    assert relative_error < 0.2


def test_state_dict_round_trip_into_a_fresh_transformed_model(transformed, tmp_path, images):
    options, model = transformed
    trained = copy.deepcopy(model)
    with torch.no_grad():  # move weights and scales away from their initial values, as training would
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.mul_(1.05).add_(0.01)
    torch.save(trained.state_dict(), tmp_path / "qat.pt")
    learned_scale_keys = [key for key in trained.state_dict() if key.endswith("scaling_impl.value")]
    assert len(learned_scale_keys) == (len(quantized_modules(trained)) if options.learned_scales else 0)

    fresh = DetectionModel("yolov10n.yaml", nc=3, verbose=False).eval()
    quantize_w4a16(fresh, options)
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True), strict=True)
    assert torch.equal(head_tensors(fresh.eval(), images), head_tensors(trained.eval(), images))


def test_deepcopy_of_transformed_model_gives_same_outputs(float_and_quantized, images):
    _, quantized, _ = float_and_quantized
    duplicate = copy.deepcopy(quantized)
    assert torch.equal(head_tensors(duplicate, images), head_tensors(quantized, images))


def test_gradients_reach_latent_weights_and_learned_scales(transformed, images):
    options, model = transformed
    model = copy.deepcopy(model).train()
    outputs = model(images)
    sum(outputs[head][key].square().mean() for head in ("one2many", "one2one") for key in ("boxes", "scores")).backward()
    for name, module in quantized_modules(model):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, name
        scale_parameters = [p for n, p in module.weight_quant.named_parameters() if n.endswith("scaling_impl.value")]
        assert len(scale_parameters) == (1 if options.learned_scales else 0)
        for scale in scale_parameters:
            assert scale.grad is not None and scale.grad.abs().sum() > 0, name


def test_frozen_copy_has_plain_convs_and_identical_outputs(float_and_quantized, images):
    _, quantized, _ = float_and_quantized
    frozen = freeze_quantized_weights(quantized)
    assert quantized_modules(frozen) == []
    assert not any(isinstance(module, QuantConv2d) for module in frozen.modules())
    assert quantized_modules(quantized)  # the original keeps its quantizers
    assert not {t.data_ptr() for t in frozen.state_dict().values()} & {t.data_ptr() for t in quantized.state_dict().values()}
    difference = (head_tensors(frozen, images) - head_tensors(quantized, images)).abs().max()
    assert difference < 1e-5


def test_report_json_round_trip(float_and_quantized):
    _, _, report = float_and_quantized
    restored = QuantizationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert restored == report
    assert restored.to_rows()[0] == {"name": "model.0.conv", "bit_width": 8, "reason": report.layers[0].reason, "out_channels": 16}


@pytest.mark.parametrize("options", OPTION_SETS + [QuantOptions(per_channel_scales=False)], ids=["learned", "statistics", "per-tensor"])
def test_fake_quantization_under_autocast_is_the_fp32_path_bit_for_bit(options):
    """AMP (the `amp` setting) runs the training forward under autocast; the weights' grid must not move with it.

    Both routes a quantized conv's weights take: the flat pass of the QAT step and the evaluation copy
    (`quantize_all`), and Brevitas' layer-by-layer `quant_weight` of a forward without a prepared result.
    """
    model = build_float_model()
    quantize_w4a16(model, options)
    model.train()
    reference = {name: weights.quantized.value for name, weights in quantize_all(model).items()}
    layer_by_layer = {name: module.quant_weight().value for name, module in quantized_modules(model)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = {name: weights.quantized.value for name, weights in quantize_all(model).items()}
        layer_by_layer_under_autocast = {name: module.quant_weight().value for name, module in quantized_modules(model)}
        # The conv itself does compute in bf16: autocast is on for the layer, only its weights' quantizer is exempt.
        conv = next(module for _, module in quantized_modules(model) if module.in_channels > 3)
        assert conv(torch.rand(1, conv.in_channels, 8, 8)).dtype == torch.bfloat16
    for name, value in reference.items():
        assert under_autocast[name].dtype == torch.float32
        assert torch.equal(under_autocast[name], value), name
        assert torch.equal(layer_by_layer_under_autocast[name], layer_by_layer[name]), name
        assert torch.equal(layer_by_layer[name], value), name


def test_the_quantizer_runs_with_autocast_off_inside_an_autocast_region():
    """What keeps the equality above when Brevitas or the flat pass gains an op on autocast's bf16 list."""
    model = build_float_model()
    quantize_w4a16(model, QuantOptions())
    model.train()
    seen: list[bool] = []
    for _, module in quantized_modules(model):
        tensor_quant = module.weight_quant.tensor_quant
        # Called by both routes: Brevitas' quantizer chain and the flat pass's scale restriction.
        tensor_quant.scaling_impl.stats_scaling_impl.restrict_clamp_scaling.register_forward_hook(
            lambda *_: seen.append(torch.is_autocast_enabled("cpu"))
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantize_all(model)
        flat_calls = len(seen)
        for _, module in quantized_modules(model):
            module.quant_weight()
    assert flat_calls > 0 and len(seen) > flat_calls
    assert not any(seen)
