"""The within-seed bootstrap of a trajectory: computed from the stored per-image statistics, stored, and reused;
the final weights are validated again only when the trajectory holds no statistics of its final epoch."""

import numpy as np
import pytest

from qat_assets.core import within_seed
from qat_assets.core.image_bootstrap import paired_bootstrap
from qat_assets.core.within_seed import keep_final_images, stored_final_images, within_seed_uncertainty
from qat_assets_tests.core.test_image_bootstrap import random_images


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    ema = random_images(rng, 24)
    return {"ema": ema, "live": random_images(rng, 24, names=[i.name for i in ema])}


def never_evaluate(which):
    raise AssertionError(f"the final {which} weights were validated again")


def test_the_result_is_the_paired_bootstrap_of_the_stored_statistics_and_is_reused(tmp_path, scored, monkeypatch):
    keep_final_images(tmp_path, "fp-1", 3, scored)
    result = within_seed_uncertainty(tmp_path, "fp-1", 3, resamples=100, seed=7, evaluate=never_evaluate, log=print)
    expected = paired_bootstrap(scored["ema"], scored["live"], resamples=100, seed=7)
    assert (result.difference, result.std, result.ci_low, result.ci_high) == (
        expected.estimate, expected.std, expected.ci_low, expected.ci_high)
    assert (result.ema_map50_95, result.live_map50_95) == (expected.first_estimate, expected.second_estimate)
    assert result.unpaired_std == pytest.approx(np.hypot(expected.first_std, expected.second_std))
    assert (result.epoch, result.images, result.resamples, result.seed, result.source) == (
        3, 24, 100, 7, "last epoch's validation")

    monkeypatch.setattr(within_seed, "paired_bootstrap", lambda *a, **k: pytest.fail("bootstrapped again"))
    assert within_seed_uncertainty(tmp_path, "fp-1", 3, resamples=100, seed=7, evaluate=never_evaluate, log=print) == result
    monkeypatch.undo()
    # Other bootstrap settings: recomputed from the stored statistics, still without validating anything.
    other = within_seed_uncertainty(tmp_path, "fp-1", 3, resamples=50, seed=7, evaluate=never_evaluate, log=print)
    assert other.resamples == 50 and other.difference == result.difference and other.std != result.std
    # New statistics under the same fingerprint and epoch (the trajectory trained again): the result follows them.
    swapped = {"ema": scored["live"], "live": scored["ema"]}
    keep_final_images(tmp_path, "fp-1", 3, swapped)
    again = within_seed_uncertainty(tmp_path, "fp-1", 3, resamples=50, seed=7, evaluate=never_evaluate, log=print)
    assert again.difference == -other.difference


def test_identical_weights_differ_by_exactly_zero_on_every_resample(tmp_path, scored):
    keep_final_images(tmp_path, "fp-1", 2, {"ema": scored["ema"], "live": scored["ema"]})
    result = within_seed_uncertainty(tmp_path, "fp-1", 2, resamples=100, seed=0, evaluate=never_evaluate, log=print)
    assert (result.difference, result.std, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0, 0.0)
    assert result.ema_map50_95 == result.live_map50_95 > 0 and result.unpaired_std > 0


@pytest.mark.parametrize("stored", [None, ("fp-0", 3), ("fp-1", 2)], ids=["none", "other-trajectory", "other-epoch"])
def test_missing_or_foreign_statistics_are_measured_again_once(tmp_path, scored, stored):
    if stored is not None:
        keep_final_images(tmp_path, *stored, scored)
    evaluated, lines = [], []

    def evaluate(which):
        evaluated.append(which)
        return scored[which]

    result = within_seed_uncertainty(tmp_path, "fp-1", 3, resamples=60, seed=0, evaluate=evaluate, log=lines.append)
    assert evaluated == ["ema", "live"] and result.source == "evaluated again"
    assert any("two val passes" in line for line in lines)
    assert stored_final_images(tmp_path, "fp-1", 3)[1] == "evaluated again"
    assert within_seed_uncertainty(tmp_path, "fp-1", 3, resamples=60, seed=0, evaluate=never_evaluate, log=print) == result
