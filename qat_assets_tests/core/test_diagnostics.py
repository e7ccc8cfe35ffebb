"""Collapse diagnostics against their definitions, on hand-built layers with known answers."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from qat_assets.core.diagnostics import (
    FrozenShadow,
    bn_variance_mismatch,
    fixed_training_images,
    model_summary,
    weight_code_statistics,
)
from qat_assets.core.quantize import StepQuantConv2d, freeze_quantized_weights, quantize_all, weight_quantizer

# Per-tensor 4-bit max-abs scale: max|w| = 7 gives a step of exactly 1, so a code is 0 exactly where |w| < 0.5.
WEIGHTS = torch.tensor([
    [0.1, -0.2, 0.3, 0.0],   # all codes 0: a dead channel
    [7.0, 0.4, 2.0, -3.0],   # one code 0
    [1.0, -1.0, 0.45, 5.0],  # one code 0
]).view(3, 1, 2, 2)


def quantized_conv(weights: torch.Tensor, learned_scales: bool) -> StepQuantConv2d:
    conv = StepQuantConv2d(1, weights.shape[0], kernel_size=2, bias=False,
                           weight_quant=weight_quantizer(4, learned_scales, per_channel_scales=False))
    with torch.no_grad():
        conv.weight.copy_(weights)
        conv.quant_weight()  # initialises a learned scale from these weights
    return conv


@pytest.mark.parametrize("learned_scales", [False, True])
def test_zero_codes_dead_channels_and_max_over_rms_match_their_definitions(learned_scales):
    model = nn.Sequential(quantized_conv(WEIGHTS, learned_scales))
    [row] = weight_code_statistics(model)
    assert row["scale"] == pytest.approx(1.0)
    assert row["zero_code_fraction"] == pytest.approx(6 / 12)
    assert row["dead_channels"] == 1
    assert row["max_over_rms"] == pytest.approx(7.0 / math.sqrt(float(WEIGHTS.square().mean())), rel=1e-6)
    assert (row["bit_width"], row["weights"], row["out_channels"]) == (4, 12, 3)
    assert row["weight_rms"] == pytest.approx(math.sqrt(float(WEIGHTS.square().mean())), rel=1e-6)
    channel_rms = sorted(math.sqrt(float(c.square().mean())) for c in WEIGHTS)
    # torch.quantile interpolates linearly: of 3 sorted values, the 10th percentile is 0.2 of the way from
    # the first to the second, the 90th 0.8 of the way from the second to the third.
    low = channel_rms[0] + 0.2 * (channel_rms[1] - channel_rms[0])
    high = channel_rms[1] + 0.8 * (channel_rms[2] - channel_rms[1])
    assert row["channel_norm_spread"] == pytest.approx(high / low, rel=1e-5)


def test_decay_of_the_small_channels_widens_the_channel_norm_spread_and_lowers_the_rms():
    before = weight_code_statistics(nn.Sequential(quantized_conv(WEIGHTS, learned_scales=False)))[0]
    shrunk = WEIGHTS.clone()
    shrunk[0] *= 0.1  # the channel a small gradient leaves to the decay
    after = weight_code_statistics(nn.Sequential(quantized_conv(shrunk, learned_scales=False)))[0]
    assert after["channel_norm_spread"] > 1.2 * before["channel_norm_spread"]
    assert after["weight_rms"] < before["weight_rms"]


def test_channels_decayed_to_exactly_zero_give_the_capped_spread_not_inf():
    weights = torch.ones(20, 1, 2, 2)
    weights[:5] = 0.0  # a quarter of the channels: the 10th percentile is 0
    [row] = weight_code_statistics(nn.Sequential(quantized_conv(weights, learned_scales=False)))
    assert row["channel_norm_spread"] == pytest.approx(1e6)
    [dead] = weight_code_statistics(nn.Sequential(quantized_conv(torch.zeros(20, 1, 2, 2), learned_scales=False)))
    assert dead["channel_norm_spread"] == pytest.approx(1e6) and dead["dead_channels"] == 20
    assert dead["max_over_rms"] == 0.0  # not 0/0: JSON and Dagster tables hold no NaN


def test_a_healthy_layer_has_no_dead_channel():
    model = nn.Sequential(quantized_conv(WEIGHTS[1:], learned_scales=True))
    [row] = weight_code_statistics(model)
    assert row["dead_channels"] == 0 and row["zero_code_fraction"] == pytest.approx(2 / 8)


def test_bn_mismatch_is_the_mean_absolute_log_variance_ratio():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2, eps=1e-3)
    model = nn.Sequential(nn.Identity(), bn)
    images = torch.randn(4, 2, 8, 8) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    batch_var = images.var(dim=(0, 2, 3), unbiased=True)
    # (running + eps) / (batch + eps) = 4 for channel 0 and 1/9 for channel 1: mean |log| = (log 4 + log 9) / 2.
    with torch.no_grad():
        bn.running_var.copy_(torch.stack([4 * (batch_var[0] + bn.eps), (batch_var[1] + bn.eps) / 9]) - bn.eps)
    [row] = bn_variance_mismatch(model, images)
    assert row == {"name": "1", "log_var_mismatch": pytest.approx(math.log(6.0), rel=1e-5)}


def test_the_shadow_copy_equals_a_fresh_frozen_copy_after_training_and_keeps_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(quantized_conv(torch.randn(4, 1, 2, 2), learned_scales=True), nn.BatchNorm2d(4))
    images = torch.randn(2, 1, 5, 5)
    shadow = FrozenShadow()
    bn_variance_mismatch(shadow.of(model, quantize_all(model)), images)  # moves the shadow's running stats
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images).square().mean().backward()  # training moves weights, scale and running statistics
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refreshed = shadow.of(model, quantize_all(model))
    fresh = freeze_quantized_weights(model)
    assert refreshed.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(refreshed.state_dict()[k], v) for k, v in fresh.state_dict().items())
    bn_variance_mismatch(refreshed, images)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_matching_statistics_give_no_mismatch():
    images = torch.randn(4, 3, 8, 8)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_var.copy_(images.var(dim=(0, 2, 3), unbiased=True))
    [row] = bn_variance_mismatch(nn.Sequential(bn), images)
    assert row["log_var_mismatch"] == pytest.approx(0.0, abs=1e-6)


def test_the_model_summary_weights_the_body_layers_and_names_the_worst():
    layers = [
        {"name": "a", "bit_width": 4, "weights": 100, "out_channels": 4, "zero_code_fraction": 0.1,
         "dead_channels": 0, "max_over_rms": 3.0, "scale": 1.0, "weight_rms": 0.1, "channel_norm_spread": 2.0},
        {"name": "b", "bit_width": 4, "weights": 300, "out_channels": 8, "zero_code_fraction": 0.5,
         "dead_channels": 2, "max_over_rms": 9.0, "scale": 1.0, "weight_rms": 0.3, "channel_norm_spread": 4.0},
        {"name": "first", "bit_width": 8, "weights": 50, "out_channels": 2, "zero_code_fraction": 0.0,
         "dead_channels": 0, "max_over_rms": 20.0, "scale": 1.0, "weight_rms": 9.0, "channel_norm_spread": 99.0},
    ]
    bn = [{"name": "bn1", "log_var_mismatch": 0.2}, {"name": "bn2", "log_var_mismatch": 0.6}]
    summary = model_summary(layers, bn, {"a": (0.0, 0.01), "b": (0.2, 0.05)})
    assert summary["bit_width"] == 4 and summary["layers"] == 2  # the 8-bit layer is left out
    assert summary["zero_code_fraction"] == pytest.approx((0.1 * 100 + 0.5 * 300) / 400)
    assert (summary["worst_zero_code_layer"], summary["dead_channels"], summary["out_channels"]) == ("b", 2, 12)
    assert (summary["worst_max_over_rms_layer"], summary["max_over_rms"]) == ("b", 6.0)
    assert (summary["weight_rms"], summary["channel_norm_spread"]) == (pytest.approx(0.2), pytest.approx(3.0))
    assert summary["bn_log_var_mismatch"] == pytest.approx(0.4) and summary["worst_bn_layer"] == "bn2"
    assert summary["oscillating_fraction"] == pytest.approx(0.15)
    assert summary["oscillation_frequency"] == pytest.approx((0.01 * 100 + 0.05 * 300) / 400)


class AugmentingDataset:
    """Draws its augmentation from Python's and NumPy's random state, as Ultralytics' training transforms do."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict:
        return {"img": torch.full((1, 2, 2), index * 10 + random.randint(0, 9), dtype=torch.uint8)}

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        return {"img": torch.stack([item["img"] for item in items])}


def test_the_fixed_batch_is_the_same_every_time_and_leaves_the_training_random_stream_alone():
    random.seed(123)
    expected_next = [random.random() for _ in range(3)]
    random.seed(123)
    first = fixed_training_images(AugmentingDataset(), 4)
    assert [random.random() for _ in range(3)] == expected_next
    assert torch.equal(first, fixed_training_images(AugmentingDataset(), 4))
    assert first.shape == (4, 1, 2, 2) and len({int(image[0, 0, 0]) // 10 for image in first}) == 4
