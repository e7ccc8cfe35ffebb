"""The FP plateau check, against its definition."""

from qat_assets.core.pretrain import plateau_check


def history(values):
    return [{"epoch": 0, "map50_95": 0.0}] + [{"epoch": i + 1, "map50_95": v} for i, v in enumerate(values)]


def test_gain_is_best_of_the_window_minus_best_before_it():
    # window of 3: best before = 0.50 (epoch 2), best in window = 0.56 -> gain 0.06, not at plateau
    check = plateau_check(history([0.40, 0.50, 0.45, 0.56, 0.52]), epochs=3, min_gain=0.01)
    assert abs(check["gain"] - 0.06) < 1e-12
    assert check["at_plateau"] is False and "NOT at plateau" in check["reason"]


def test_a_flat_but_noisy_tail_is_at_plateau():
    check = plateau_check(history([0.20, 0.70, 0.69, 0.705, 0.698]), epochs=3, min_gain=0.01)
    assert abs(check["gain"] - 0.005) < 1e-12 and check["at_plateau"] is True


def test_a_history_no_longer_than_the_window_cannot_tell():
    check = plateau_check(history([0.1, 0.2, 0.3]), epochs=3, min_gain=0.01)
    assert check["gain"] is None and check["at_plateau"] is None and "needs more than 3" in check["reason"]
