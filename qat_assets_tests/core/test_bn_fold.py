"""BN folded into W4 convs before export: integer codes kept, outputs unchanged (tiny untrained yolo10n, 64 px)."""

import copy

import pytest
import torch
from brevitas.nn import QuantConv2d
from torch import nn

from qat_assets.core.bn_fold import fold_batchnorms, fold_bn_into_quant_conv
from qat_assets.core.models import build_detection_model
from qat_assets.core.quantize import QuantOptions, quantize_w4a16, quantized_modules, weight_quantizer


def _model_with_trained_looking_bns(options: QuantOptions) -> nn.Module:
    """Random BN statistics and affine terms, some gammas negative, as after training (fresh BNs are identities)."""
    torch.manual_seed(0)
    model = build_detection_model("yolo10n", ["a", "b", "c"])
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.weight.data = torch.randn(n)
            bn.bias.data = 0.1 * torch.randn(n)
            bn.running_mean = 0.1 * torch.randn(n)
            bn.running_var = torch.rand(n) + 0.5
    quantize_w4a16(model, options)
    return model.eval()


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: conv.quant_weight().int() for name, conv in quantized_modules(model)}


@torch.no_grad()
def test_folded_model_keeps_codes_and_outputs_and_has_no_bn():
    model = _model_with_trained_looking_bns(QuantOptions())
    images = torch.rand(2, 3, 64, 64)
    before, codes = model(images)[0], _codes(model)
    gammas = {name.rsplit(".", 1)[0]: bn.weight.clone() for name, bn in model.named_modules() if isinstance(bn, nn.BatchNorm2d)}

    folded = copy.deepcopy(model)
    assert fold_batchnorms(folded) == {}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    after = folded(images)[0]
    assert float((before - after).abs().max() / before.abs().max()) < 1e-5

    flipped = 0
    for name, new in _codes(folded).items():
        gamma = gammas.get(name.rsplit(".", 1)[0], torch.ones(new.shape[0]))  # head output convs have no BN
        sign = torch.sign(gamma).view(-1, 1, 1, 1).to(torch.int32)
        assert torch.equal(new, codes[name] * sign), name  # same codes; negated where gamma < 0
        flipped += int((sign < 0).sum())
    assert flipped > 0  # the negative-gamma path was exercised


@torch.no_grad()
def test_identity_bn_leaves_weights_and_scale_as_they_were():
    conv = quantize_single_conv()
    bn = nn.BatchNorm2d(8, eps=0.0).eval()  # gamma 1, beta 0, mean 0, var 1: the identity
    weight, scale = conv.quant_weight().value.clone(), conv.quant_weight().scale.clone()
    fold_bn_into_quant_conv(conv, bn)
    assert torch.equal(conv.quant_weight().value, weight) and torch.equal(conv.quant_weight().scale, scale)
    assert torch.equal(conv.bias, torch.zeros(8))


@torch.no_grad()
def test_known_bn_scales_the_scale_and_shifts_the_bias():
    conv = quantize_single_conv()
    bn = nn.BatchNorm2d(8, eps=0.0).eval()
    bn.weight.data = torch.full((8,), 3.0)
    bn.bias.data = torch.full((8,), 0.5)
    bn.running_mean = torch.full((8,), 2.0)
    bn.running_var = torch.full((8,), 4.0)  # sigma 2: factor 1.5
    scale = conv.quant_weight().scale.clone()
    fold_bn_into_quant_conv(conv, bn)
    torch.testing.assert_close(conv.quant_weight().scale, 1.5 * scale)
    torch.testing.assert_close(conv.bias, torch.full((8,), 0.5 - 2.0 * 1.5))


def test_per_tensor_scales_keep_their_bn_and_say_why():
    model = _model_with_trained_looking_bns(QuantOptions(per_channel_scales=False))
    kept = fold_batchnorms(model)
    assert kept and set(kept.values()) == {"per-tensor weight scale"}
    with pytest.raises(ValueError, match="per-output-channel"):
        name = next(iter(kept))
        fold_bn_into_quant_conv(model.get_submodule(name).conv, model.get_submodule(name).bn, name)


def quantize_single_conv() -> QuantConv2d:
    """A 4-bit conv with a learned per-channel scale, initialised from random weights, as the W4A16 transform builds."""
    torch.manual_seed(1)
    conv = QuantConv2d(4, 8, 3, bias=False, weight_quant=weight_quantizer(4, learned_scales=True))
    conv.quant_weight()
    return conv.eval()
