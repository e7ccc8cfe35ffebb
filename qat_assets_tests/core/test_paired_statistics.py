"""Paired statistics against values computed independently: t-table quantiles, mpmath's incomplete beta,
hand-enumerated sign flips and binomial tails."""

import math
import statistics

import mpmath
import pytest

from qat_assets.core.paired_statistics import (
    paired_difference,
    seeds_needed,
    sign_flip_p,
    sign_test_p,
    student_t_coverage,
    student_t_quantile,
)

# Two-sided 95 % quantiles of Student's t from a printed table (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2).
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert student_t_quantile(0.95, df) == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 6, 7, 12])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 7.0])
def test_t_coverage_matches_the_regularized_incomplete_beta(df, t):
    # P(|T| <= t) = 1 - I_{df/(df+t^2)}(df/2, 1/2), evaluated by mpmath: an independent route.
    reference = 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True)
    assert student_t_coverage(t, df) == pytest.approx(float(reference), abs=1e-12)


def test_t_interval_of_known_differences():
    d = [0.10, 0.12, 0.08, 0.11, 0.09]
    result = paired_difference("ema - baseline", [0, 1, 2, 3, 4], d)
    se = statistics.stdev(d) / math.sqrt(5)
    assert result.mean == pytest.approx(0.10) and result.standard_error == pytest.approx(se)
    assert (result.ci_low, result.ci_high) == (pytest.approx(0.10 - 2.776 * se, abs=1e-5),
                                               pytest.approx(0.10 + 2.776 * se, abs=1e-5))
    assert result.real and result.positive
    assert result.p_sign_flip == pytest.approx(2 / 32)  # all five positive: only all-plus and all-minus reach it


def test_an_interval_that_straddles_zero_is_not_real_and_one_seed_has_no_interval():
    mixed = paired_difference("x", [0, 1], [0.05, -0.01])
    assert mixed.real is False and not mixed.positive
    single = paired_difference("x", [0], [0.3])
    assert single.real is None and single.standard_error is None and single.p_sign_flip == 1.0
    with pytest.raises(ValueError, match="2 seeds but 1 differences"):
        paired_difference("x", [0, 1], [0.1])


def test_more_seeds_than_exact_enumeration_allows_still_give_an_interval():
    many = paired_difference("x", list(range(17)), [0.01 * (i % 3) for i in range(17)])
    assert many.p_sign_flip is None and many.real and many.ci_low > 0
    with pytest.raises(ValueError, match="more than 16"):
        sign_flip_p([0.1] * 17)


def test_sign_flip_p_by_hand():
    # d = (3, -1, 2): the 8 sign patterns give |sum| 6, 2, 4, 0, each twice; the observed |sum| is 4.
    d = [3, -1, 2]
    sums = sorted(abs(a * 3 + b * -1 + c * 2) for a in (1, -1) for b in (1, -1) for c in (1, -1))
    assert sums == [0, 0, 2, 2, 4, 4, 6, 6]
    assert sign_flip_p(d) == pytest.approx(4 / 8)  # |observed sum| = 4: patterns with 4 or 6
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert sign_flip_p([0.0, 0.0]) == 1.0
    # Two-sided: a negative mean is as extreme as a positive one of the same size.
    assert sign_flip_p([-3, 1, -2]) == pytest.approx(4 / 8) and sign_flip_p([-1.0, -2.0, -3.0]) == pytest.approx(2 / 8)


def test_sign_test_p_and_the_seeds_the_smallest_p_needs():
    assert sign_test_p(2, 2) == 0.25
    assert sign_test_p(4, 5) == pytest.approx((5 + 1) / 32)
    assert sign_test_p(0, 3) == 1.0
    assert sign_test_p(5, 5) == pytest.approx(0.03125)
    assert seeds_needed(0.05) == 5 and seeds_needed(0.05, one_sided=False) == 6
    # p must fall below alpha: 4 seeds reach exactly 1/16 one-sided, which is not below 1/16
    assert seeds_needed(1 / 16) == 5 and seeds_needed(1 / 16, one_sided=False) == 6
    with pytest.raises(ValueError, match="0..n"):
        sign_test_p(4, 3)
