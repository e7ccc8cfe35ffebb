"""Per-image statistics and the bootstrap over val images, against known answers and Ultralytics' own reduction."""

from pathlib import Path

import numpy as np
import pytest
import torch

from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.image_bootstrap import ImageStats, bootstrap_map, map50_95, paired_bootstrap, record_per_image
from qat_assets.core.models import build_detection_model
from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set


def image(name, correct, cls=0, conf=0.9):
    """One target and one prediction of class `cls`, correct at every IoU threshold or at none."""
    return ImageStats(name=name, tp=np.full((1, 10), correct), conf=np.array([conf]), pred_cls=np.array([float(cls)]),
                      target_cls=np.array([float(cls)]))


def test_map_of_known_sets():
    # Ultralytics integrates the precision envelope over 101 recall points with the trapezoid rule:
    # precision 1 up to recall 1 gives 1 - 0.01 / 2; up to recall 0.5 gives 0.5 - 0.01 / 2.
    assert map50_95([image(str(i), True) for i in range(4)]) == pytest.approx(0.995)
    assert map50_95([image("a", True, conf=0.9), image("b", False, conf=0.8)]) == pytest.approx(0.495)
    assert map50_95([]) == 0.0


def test_recorded_statistics_reproduce_ultralytics_own_map():
    from ultralytics.utils.metrics import DetMetrics

    class Validator:  # what record_per_image touches: the validator's DetMetrics
        metrics = DetMetrics(names={0: "a", 1: "b", 2: "c"})

    rng = np.random.default_rng(0)
    sink = []
    record_per_image(Validator, sink)
    for i in range(12):
        predictions = int(rng.integers(0, 5))
        Validator.metrics.update_stats({
            "tp": rng.random((predictions, 10)) < 0.5, "conf": rng.random(predictions),
            "pred_cls": rng.integers(0, 3, predictions).astype(float),
            "target_cls": rng.integers(0, 3, int(rng.integers(1, 4))).astype(float),
            "target_img": np.zeros(0), "im_name": f"{i}.png",
        })
    Validator.metrics.process()
    assert len(sink) == 12 and sink[3].name == "3.png"
    assert map50_95(sink) == pytest.approx(Validator.metrics.box.map, abs=1e-12)
    assert 0.05 < map50_95(sink) < 0.95  # random matches: a value in the middle, not a degenerate 0 or 1


def test_bootstrap_of_known_sets():
    perfect = [image(str(i), True) for i in range(8)]
    assert bootstrap_map(perfect, resamples=20).model_dump() == dict(
        estimate=pytest.approx(0.995), std=pytest.approx(0.0), ci_low=pytest.approx(0.995),
        ci_high=pytest.approx(0.995), images=8, resamples=20)
    wrong = [image(str(i), False) for i in range(8)]
    difference = paired_bootstrap(perfect, wrong, resamples=20)
    assert difference.ci_low == difference.ci_high == pytest.approx(0.995)
    mixed = [image(str(i), i % 2 == 0, conf=0.5 + 0.05 * i) for i in range(16)]
    result = bootstrap_map(mixed, resamples=200, seed=1)
    assert result.estimate == map50_95(mixed) and result.std > 0.05 and result.ci_low < result.estimate < result.ci_high
    assert bootstrap_map(mixed, resamples=200, seed=1) == result  # seeded
    # The interval is the 2.5 % and 97.5 % percentiles of the resampled values, recomputed here by hand:
    # sort the 200 draws; numpy's linear interpolation puts 2.5 % at rank 0.025 x 199 = 4.975.
    draws = np.random.default_rng(1).integers(0, 16, size=(200, 16))
    values = sorted(map50_95([mixed[i] for i in draw]) for draw in draws)
    assert result.ci_low == pytest.approx(values[4] + 0.975 * (values[5] - values[4]))
    assert result.ci_high == pytest.approx(values[194] + 0.025 * (values[195] - values[194]))
    same = paired_bootstrap(mixed, mixed, resamples=50)
    assert (same.estimate, same.std, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0, 0.0)


def test_paired_bootstrap_needs_the_same_images():
    with pytest.raises(ValueError, match="same images in the same order"):
        paired_bootstrap([image("a", True)], [image("b", True)])
    with pytest.raises(ValueError, match="evaluate with `per_image` first"):
        bootstrap_map([])


def test_evaluate_model_records_every_val_image(tmp_path):
    yaml = write_tiny_yolo_set(tmp_path / "set", 4, 64)
    torch.manual_seed(0)
    model = build_detection_model("yolo10n", ["red", "green", "blue"])
    images = []
    metrics = evaluate_model(model, Path(yaml), imgsz=64, batch=2, device="cpu", workers=0, work_dir=tmp_path / "w",
                             per_image=images)
    assert sorted(i.name for i in images) == [f"{i}.png" for i in range(4)]
    assert sum(len(i.target_cls) for i in images) == 6  # one or two boxes per image, alternating
    assert map50_95(images) == pytest.approx(metrics["map50_95"], abs=1e-12)
