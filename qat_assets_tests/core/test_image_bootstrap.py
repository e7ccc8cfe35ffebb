"""Per-image statistics and the bootstrap over val images, against known answers and Ultralytics' own reduction."""

from pathlib import Path

import numpy as np
import pytest
import torch

from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.image_bootstrap import (
    ImageStats,
    bootstrap_map,
    image_arrays,
    images_from_arrays,
    map50_95,
    paired_bootstrap,
    record_per_image,
    recording_per_image,
)
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


def random_images(rng, count, names=None):
    """Images of 3 classes whose predictions are correct with a per-image rate: some images easy, some hard."""
    images = []
    for index in range(count):
        predictions, rate = int(rng.integers(1, 6)), rng.random()
        images.append(ImageStats(
            name=names[index] if names else f"{index}.png", tp=rng.random((predictions, 10)) < rate,
            conf=rng.random(predictions), pred_cls=rng.integers(0, 3, predictions).astype(float),
            target_cls=rng.integers(0, 3, int(rng.integers(1, 4))).astype(float)))
    return images


def test_pairing_narrows_the_interval_exactly_when_the_two_models_share_their_images_difficulty():
    rng = np.random.default_rng(3)
    first = random_images(rng, 48)
    # The same images scored by a nearly identical model: 5 % of its matches flipped. Per image, its result
    # follows the first model's, so resampling the images moves both alike and the difference hardly at all.
    close = [ImageStats(name=i.name, tp=i.tp ^ (rng.random(i.tp.shape) < 0.05), conf=i.conf, pred_cls=i.pred_cls,
                        target_cls=i.target_cls) for i in first]
    paired = paired_bootstrap(first, close, resamples=300, seed=5)
    # Each model's own figures are those of its bootstrap over the same draws (the same generator and seed).
    assert paired.first_std == pytest.approx(bootstrap_map(first, resamples=300, seed=5).std, abs=1e-12)
    assert paired.second_std == pytest.approx(bootstrap_map(close, resamples=300, seed=5).std, abs=1e-12)
    assert (paired.first_estimate, paired.second_estimate) == (map50_95(first), map50_95(close))
    assert paired.estimate == map50_95(first) - map50_95(close)
    unpaired = np.hypot(paired.first_std, paired.second_std)
    assert paired.std < 0.5 * unpaired
    assert paired.ci_high - paired.ci_low < 0.5 * 2 * 1.96 * unpaired
    # A model unrelated to the first on the same images (their own difficulty, drawn independently): pairing
    # cannot cancel what the two do not share, so the paired spread is about the unpaired one.
    unrelated = random_images(rng, 48, names=[i.name for i in first])
    paired = paired_bootstrap(first, unrelated, resamples=300, seed=5)
    assert 0.75 < paired.std / np.hypot(paired.first_std, paired.second_std) < 1.25


def test_recording_is_limited_to_its_block_and_the_statistics_survive_flat_arrays():
    from ultralytics.utils.metrics import DetMetrics

    class Validator:
        metrics = DetMetrics(names={0: "a", 1: "b", 2: "c"})

    rng = np.random.default_rng(1)
    images = random_images(rng, 6) + [ImageStats(name="empty.png", tp=np.zeros((0, 10), bool), conf=np.zeros(0),
                                                 pred_cls=np.zeros(0), target_cls=np.array([1.0]))]

    def score(image):
        Validator.metrics.update_stats({"tp": image.tp, "conf": image.conf, "pred_cls": image.pred_cls,
                                        "target_cls": image.target_cls, "target_img": np.unique(image.target_cls),
                                        "im_name": image.name})

    score(images[0])
    with recording_per_image(Validator) as inside:
        for image in images[1:]:
            score(image)
    score(images[0])
    assert [i.name for i in inside] == [i.name for i in images[1:]]
    assert "update_stats" not in vars(Validator.metrics)  # the validator's own method again
    again = images_from_arrays(image_arrays(inside, "ema"), "ema")
    assert [i.name for i in again] == [i.name for i in inside]
    for before, after in zip(inside, again):
        for field in ("tp", "conf", "pred_cls", "target_cls"):
            assert np.array_equal(getattr(before, field), getattr(after, field))
    assert map50_95(again) == map50_95(inside)
