"""Paired statistics over seeds: mean difference, its standard error, a 95 % t-interval and exact p-values.

The baseline and EMA runs of one seed share one training trajectory, and +BN / +QC fix the very weights of
their run, so a difference d_i taken within seed i cancels the trajectory's noise. What a difference must
beat is the spread of d_i over seeds:

- t-interval: mean(d) ± t(0.975, n-1) · sd(d)/√n, defined from two seeds on. "Real" means it excludes 0.
- exact sign-flip p (two-sided): under "no effect" each d_i is as likely positive as negative, so each of
  the 2^n sign patterns is equally likely; p is the share of patterns whose |mean| reaches the observed one.
- sign test (one-sided): k of n seeds went the predicted way; p = P(Binomial(n, 1/2) >= k).

With n seeds the smallest p either exact test can give is 1/2^n one-sided and 2/2^n two-sided, whatever the
data: one-sided p < 0.05 needs 5 seeds, two-sided 6. `seeds_needed` says so in the report.

Written out rather than imported: scipy is not among the project's dependencies, and each piece is short.
Student's t has a closed-form distribution function for integer degrees of freedom (Abramowitz & Stegun
26.7.3-4), which bisection inverts exactly enough.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

from pydantic import BaseModel

CONFIDENCE = 0.95
# Enumerating 2^n sign patterns is exact and instant up to here; beyond it the count is astronomical.
MAX_EXACT_SEEDS = 16


def student_t_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (integer >= 1) degrees of freedom, A&S 26.7.3 (odd) / 26.7.4 (even)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:
        total, term = 0.0, c
        for power in range(1, df - 1, 2):  # cos θ + (2/3) cos³θ + (2·4)/(3·5) cos⁵θ + ... up to cos^(df-2)θ
            total += term
            term *= c * c * (power + 1) / (power + 2)
        return 2 / math.pi * (theta + s * total)
    total, term = 0.0, 1.0
    for power in range(0, df - 1, 2):  # 1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ... up to cos^(df-2)θ
        total += term
        term *= c * c * (power + 1) / (power + 2)
    return s * total


def student_t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = `confidence`: the half-width multiplier of a two-sided interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while student_t_coverage(high, df) < confidence:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_coverage(middle, df) < confidence else (low, middle)
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of mean(differences) against 0."""
    n = len(differences)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if n > MAX_EXACT_SEEDS:
        raise ValueError(f"exact sign flips enumerate 2^n patterns; {n} differences is more than {MAX_EXACT_SEEDS}")
    observed = abs(sum(differences))
    tolerance = 1e-12 * max(1.0, sum(abs(d) for d in differences))  # the observed pattern must count itself
    hits = sum(
        abs(sum(sign * d for sign, d in zip(signs, differences))) >= observed - tolerance
        for signs in itertools.product((1, -1), repeat=n)
    )
    return hits / 2**n


def sign_test_p(successes: int, n: int) -> float:
    """Exact one-sided sign-test p-value: P(Binomial(n, 1/2) >= successes)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n, got {successes} of {n}")
    return sum(math.comb(n, j) for j in range(successes, n + 1)) / 2**n


def seeds_needed(alpha: float = 0.05, *, one_sided: bool = True) -> int:
    """The fewest seeds whose smallest attainable exact p (1/2^n one-sided, 2/2^n two-sided) is below `alpha`."""
    n = 1
    while (1 if one_sided else 2) / 2**n >= alpha:
        n += 1
    return n


class PairedDifference(BaseModel):
    """One contrast (e.g. "ema+QC - baseline") over the seeds where both sides are known."""

    contrast: str
    seeds: list[int]
    differences: list[float]
    mean: float | None
    standard_error: float | None  # None with fewer than two seeds
    ci_low: float | None
    ci_high: float | None
    p_sign_flip: float | None  # exact, two-sided; None beyond MAX_EXACT_SEEDS (the interval still decides)

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def real(self) -> bool | None:
        """True when the 95 % interval excludes 0; None when there is no interval (fewer than two seeds)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def positive(self) -> bool:
        """Real and above 0: the contrast's first side beats its second by more than the paired uncertainty."""
        return bool(self.real) and self.mean is not None and self.mean > 0


def paired_difference(contrast: str, seeds: Sequence[int], differences: Sequence[float]) -> PairedDifference:
    """Mean, standard error, 95 % t-interval and exact sign-flip p of per-seed differences."""
    if len(seeds) != len(differences):
        raise ValueError(f"{contrast}: {len(seeds)} seeds but {len(differences)} differences")
    d = [float(x) for x in differences]
    n = len(d)
    mean = statistics.fmean(d) if d else None
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else None
    half = student_t_quantile(CONFIDENCE, n - 1) * se if se is not None else None
    return PairedDifference(
        contrast=contrast, seeds=list(seeds), differences=d, mean=mean, standard_error=se,
        ci_low=mean - half if half is not None else None, ci_high=mean + half if half is not None else None,
        p_sign_flip=sign_flip_p(d) if 0 < n <= MAX_EXACT_SEEDS else None,  # more seeds must not stop the report
    )
