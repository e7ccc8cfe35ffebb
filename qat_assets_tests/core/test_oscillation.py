"""Oscillation tracking on hand-built integer sequences and on a real quantized YOLOv10n."""

from __future__ import annotations

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.oscillation import OscillationTracker
from qat_assets.core.quantize import QuantOptions, quantize_w4a16, quantized_modules

# Columns: flips 0,1,0,1,0 / rises steadily / changes once and stays / goes up, pauses, comes back down.
SEQUENCE = torch.tensor(
    [
        [0, 0, 0, 0],
        [1, 1, 1, 1],
        [0, 2, 1, 1],
        [1, 3, 1, 0],
        [0, 4, 1, 0],
    ]
)


def feed(tracker: OscillationTracker, rows: torch.Tensor, name: str = "layer") -> None:
    for row in rows:
        tracker.update(name, row)


def test_frequencies_match_a_hand_computed_sequence():
    tracker = OscillationTracker(momentum=0.5, threshold=0.3)
    feed(tracker, SEQUENCE)
    # Oscillation events per step (steps 1..4): flipper 0,1,1,1; riser none; step once none; pause 0,0,1,0.
    # f <- 0.5*o + 0.5*f: flipper 0 -> 0.5 -> 0.75 -> 0.875; pause 0 -> 0 -> 0.5 -> 0.25.
    assert torch.allclose(tracker.frequencies("layer"), torch.tensor([0.875, 0.0, 0.0, 0.25]))
    assert tracker.per_layer() == {"layer": 0.25}
    assert tracker.oscillating_fraction() == 0.25


def test_flipping_weight_oscillates_monotonic_and_settled_weights_never_do():
    tracker = OscillationTracker()  # momentum 0.01, threshold 0.03
    steps = 200
    flipper = torch.arange(steps) % 2
    riser = torch.arange(steps) // 7  # changes every 7th step, always upwards
    settled = (torch.arange(steps) > 3).long() * -2  # one change at step 4, then constant
    feed(tracker, torch.stack([flipper, riser, settled], dim=1))
    frequencies = tracker.frequencies("layer")
    assert frequencies[0] > 0.8  # approaches 1 - 0.99**198
    assert frequencies[1] == 0 and frequencies[2] == 0
    assert tracker.oscillating_fraction() == pytest.approx(1 / 3)


def test_oscillation_frequency_decays_once_the_weight_settles():
    tracker = OscillationTracker(momentum=0.01, threshold=0.005)
    feed(tracker, torch.tensor([[0], [1], [0]]))  # one event: f = 0.01
    assert tracker.oscillating_fraction() == 1.0
    feed(tracker, torch.zeros(100, 1, dtype=torch.long))  # 0.01 * 0.99**100 = 0.0037 < 0.005
    assert tracker.oscillating_fraction() == 0.0


def test_default_threshold_ignores_a_single_flip_but_catches_repeated_ones():
    tracker = OscillationTracker()
    assert tracker.threshold >= 2 * tracker.momentum
    feed(tracker, torch.tensor([[0, 0], [1, 1], [0, 0]]))  # one event each: f = momentum
    assert tracker.oscillating_fraction() == 0.0
    feed(tracker, torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]]))  # column 0 keeps flipping
    assert tracker.per_layer() == {"layer": 0.5}


def test_state_dict_resume_continues_exactly(tmp_path):
    uninterrupted = OscillationTracker(momentum=0.2, threshold=0.5)
    first_half = OscillationTracker(momentum=0.2, threshold=0.5)
    feed(uninterrupted, SEQUENCE)
    feed(first_half, SEQUENCE[:3])
    torch.save(first_half.state_dict(), tmp_path / "tracker.pt")
    resumed = OscillationTracker()
    resumed.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    feed(resumed, SEQUENCE[3:])
    assert resumed.momentum == 0.2
    assert torch.equal(resumed.frequencies("layer"), uninterrupted.frequencies("layer"))


def test_layers_updated_together_match_layers_updated_one_by_one_and_resume_exactly(tmp_path):
    """update_layers (one pass over all layers, the QAT step's path) against per-layer updates, across a resume."""
    generator = torch.Generator().manual_seed(0)
    steps = [{"a": torch.randint(-7, 8, (3, 2, 2), generator=generator),
              "b": torch.randint(-7, 8, (5,), generator=generator)} for _ in range(12)]
    one_by_one = OscillationTracker(momentum=0.2, threshold=0.3)
    together = OscillationTracker(momentum=0.2, threshold=0.3)
    for codes in steps[:6]:
        for name, layer_codes in codes.items():
            one_by_one.update(name, layer_codes)
        together.update_layers(list(codes.items()))
    torch.save(together.state_dict(), tmp_path / "tracker.pt")
    resumed = OscillationTracker()
    resumed.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    for codes in steps[6:]:
        for name, layer_codes in codes.items():
            one_by_one.update(name, layer_codes)
        resumed.update_layers(list(codes.items()))
    for name in ("a", "b"):
        assert resumed.frequencies(name).shape == steps[0][name].shape
        assert torch.equal(resumed.frequencies(name), one_by_one.frequencies(name))
    assert resumed.per_layer() == one_by_one.per_layer() and resumed.oscillating_fraction() > 0
    with pytest.raises(ValueError, match="some of"):
        resumed.update_layers([("a", steps[0]["a"]), ("new", steps[0]["b"])])


def test_update_model_tracks_only_4_bit_layers_and_sees_flipping_weights():
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    report = quantize_w4a16(model, QuantOptions(learned_scales=True, keep_first_last_8bit=True))
    four_bit = {layer.name for layer in report.layers if layer.bit_width == 4}
    assert four_bit and len(four_bit) < len(quantized_modules(model))  # the 8-bit first conv and head exist
    layer_name, layer = quantized_modules(model)[3]
    tracker = OscillationTracker(momentum=0.1, threshold=0.15)
    latent = layer.weight.detach().clone()
    scale = layer.quant_weight().scale.detach()
    for step in range(4):  # push every weight of one layer half a quantization step up and back down
        with torch.no_grad():
            layer.weight.copy_(latent + (0.5 * scale if step % 2 else 0.0))
        tracker.update_model(model)
    per_layer = tracker.per_layer()
    assert set(per_layer) == four_bit
    assert per_layer[layer_name] > 0.3
    assert sum(fraction for name, fraction in per_layer.items() if name != layer_name) == 0.0


def test_settings_refuse_a_threshold_below_twice_the_momentum():
    from qat_assets.core.settings import SettingsError, load_settings

    assert load_settings({"profile": "smoke"}, environ={}).oscillation_threshold == 0.03
    with pytest.raises(SettingsError, match="at least 2x oscillation_momentum"):
        load_settings({"profile": "smoke", "oscillation_threshold": 0.005}, environ={})


def test_a_run_with_no_layer_at_or_below_the_tracked_bit_width_tracks_nothing():
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    quantize_w4a16(model, QuantOptions(weight_bit_width=8))
    tracker = OscillationTracker()  # tracks 4 bits or fewer
    tracker.update_model(model)
    tracker.update_model(model)
    assert tracker.per_layer() == {} and tracker.oscillating_fraction() == 0.0


def test_layer_statistics_give_the_oscillating_fraction_and_the_mean_frequency():
    tracker = OscillationTracker(momentum=0.5, threshold=0.3)
    feed(tracker, SEQUENCE)
    [(fraction, frequency)] = tracker.layer_statistics().values()
    assert fraction == 0.25 and frequency == pytest.approx((0.875 + 0.25) / 4)
