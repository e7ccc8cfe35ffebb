"""Stability verdicts: did a QAT run (and the QAT run + QC or + BN) finish, and did it keep what it had?

The primary metric is mAP50-95(B). Epoch 0 is the freshly quantized pretrained model (PTQ), not training.
One validation of a small val set is noisy, and a maximum over many epochs is biased upward, so best and
final are medians over a window of m validations (`window`, default 3; fewer when the run validated fewer
trained epochs):

- best: the highest running median over the trained epochs' validations (epoch 0 excluded);
- final: the median of the last m validations.

Epochs without a validation (metrics None, sparse validation) are skipped: the window runs over
validations, not epochs. Rules, in the order they are applied:

1. `incomplete`: the run crashed, diverged, produced a non-finite metric, trained fewer distinct epochs
   than planned, or validated none of them. Incomplete runs never count toward the gate.
2. `completed-failed`, naming every rule that failed:
   - degenerate: PTQ, best and final are all at or below `degenerate_map` (nothing was learned, so
     "collapse" would be meaningless);
   - collapsed: final < `collapse_ratio` × best (the early peak, then collapse);
   - fell below PTQ: final < `collapse_ratio` × the PTQ value (QAT ended worse than not training at all).
3. `completed-success` otherwise.

A collapse like the seed report's (0.226 at epoch 29, 0.012 at 76) stays a collapse: unless the peak was a
single validation, its neighbours are near it and the running median keeps most of it, and a collapse
that stays down puts the median of the last m validations near the final value; 0.012 is 5 % of 0.226,
far below 50 %. What the medians no longer call a collapse is a one-validation spike or a one-validation
dip that recovers before the last m validations.

Every verdict carries a reason a person can read without looking at the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from qat_assets.core.summary import BNResult, EpochRecord, PostHocResult, QCResult, Stability

DEFAULT_COLLAPSE_RATIO = 0.5
DEFAULT_DEGENERATE_MAP = 0.01
DEFAULT_WINDOW = 3


def classify_qat(
    history: Sequence[EpochRecord],
    planned_epochs: int,
    *,
    diverged_at_epoch: int | None = None,
    error: str | None = None,
    collapse_ratio: float = DEFAULT_COLLAPSE_RATIO,
    degenerate_map: float = DEFAULT_DEGENERATE_MAP,
    window: int = DEFAULT_WINDOW,
) -> Stability:
    """Classify a QAT run from its per-epoch history.

    The numbers are reported even for incomplete runs, so a reader sees how far it got.
    """
    if planned_epochs < 1:
        raise ValueError(f"planned_epochs must be at least 1, got {planned_epochs}")
    if window < 1:
        raise ValueError(f"the stability window must be at least 1 validation, got {window}")
    trained = sorted((r for r in history if r.epoch >= 1), key=lambda r: r.epoch)
    validated = [r for r in trained if r.map50_95 is not None]
    ptq = next((r.map50_95 for r in history if r.epoch == 0 and r.map50_95 is not None), None)
    finite = [r for r in validated if math.isfinite(r.map50_95)]
    numbers = _windowed(finite, window, ptq if ptq is not None and math.isfinite(ptq) else None, collapse_ratio)

    if error:
        return Stability(status="incomplete", reason=f"crashed: {error}", **numbers)
    if diverged_at_epoch is not None:
        return Stability(status="incomplete", reason=f"diverged at epoch {diverged_at_epoch} (non-finite loss)", **numbers)
    not_finite = [r.epoch for r in validated if not math.isfinite(r.map50_95)]
    if not_finite:
        return Stability(status="incomplete", reason=f"mAP50-95 is not finite at epoch {not_finite[0]}", **numbers)
    done = len({r.epoch for r in trained})
    if done < planned_epochs:
        return Stability(
            status="incomplete", reason=f"trained {done} of {planned_epochs} planned epochs (interrupted)", **numbers
        )
    if not validated:
        return Stability(status="incomplete", reason=f"none of the {done} trained epochs was validated", **numbers)
    return _verdict(numbers, "final", degenerate_map)


def classify_with_qc(
    qat: Stability,
    qc: QCResult | None,
    *,
    qc_error: str | None = None,
    collapse_ratio: float = DEFAULT_COLLAPSE_RATIO,
    degenerate_map: float = DEFAULT_DEGENERATE_MAP,
) -> Stability:
    """Classify the QAT run + QC outcome (see `classify_corrected`)."""
    return classify_corrected(qat, qc, "QC", error=qc_error, collapse_ratio=collapse_ratio,
                              degenerate_map=degenerate_map)


def classify_with_bn(
    qat: Stability,
    bn: BNResult | None,
    *,
    bn_error: str | None = None,
    collapse_ratio: float = DEFAULT_COLLAPSE_RATIO,
    degenerate_map: float = DEFAULT_DEGENERATE_MAP,
) -> Stability:
    """Classify the QAT run + BN re-estimation outcome, by the same rules as `classify_with_qc`."""
    return classify_corrected(qat, bn, "BN re-estimation", error=bn_error, collapse_ratio=collapse_ratio,
                              degenerate_map=degenerate_map)


def classify_corrected(
    qat: Stability,
    result: PostHocResult | None,
    what: str,
    *,
    error: str | None = None,
    collapse_ratio: float = DEFAULT_COLLAPSE_RATIO,
    degenerate_map: float = DEFAULT_DEGENERATE_MAP,
) -> Stability:
    """A post-hoc fix of the final weights (`what`: QC, BN re-estimation): the QAT run's final moved by the fix.

    The fix is applied to the last weights and measured once, before and after, on the same val images: its
    delta is that paired difference. The final is the QAT run's final (the window median) plus that delta,
    so every final of the comparison is a window median and "+QC − baseline" is "the run − baseline" plus
    QC's own effect (a rejected QC, delta 0, leaves the run's final exactly). Taking the single measurement
    after the fix as the final instead mixed one validation with a median of m: a QC that changed nothing
    read up to +0.007 against its baseline in the embedded ladder. The deployed model's own figure stays in
    the result (`map50_95_after`). Best and PTQ stay the QAT run's, so
    `final_over_best` may exceed 1 when the fix lifts the final model above the training peak. The QAT
    run's `final_spread` stays as this run's validation noise. Incomplete when the QAT run is incomplete, or
    the fix failed, is missing or produced a non-finite metric.
    """
    if qat.status == "incomplete":
        return qat.model_copy(update={"reason": f"QAT run incomplete: {qat.reason}"})
    kept = qat.model_dump(exclude={"status", "reason", "failed_rules"})
    if error:
        return Stability(status="incomplete", reason=f"{what} crashed: {error}", **kept)
    if result is None:
        return Stability(status="incomplete", reason=f"{what} result is missing ({what} has not run)", **kept)
    if not math.isfinite(result.map50_95_after):
        return Stability(status="incomplete", reason=f"{what} produced a non-finite mAP50-95", **kept)
    final = qat.final + result.delta if qat.final is not None else result.map50_95_after
    numbers = {**kept, "final": final, "collapse_ratio": collapse_ratio,
               "final_over_best": final / qat.best if qat.best else None}
    label = f"final + {what}'s delta"
    return _verdict(numbers, label, degenerate_map)


def is_collapsed(stability: Stability) -> bool:
    """Complete, learned something, and fell below the collapse ratio of its best trained window."""
    return stability.status == "completed-failed" and "collapsed" in stability.failed_rules


def _windowed(validated: Sequence[EpochRecord], window: int, ptq: float | None, collapse_ratio: float) -> dict:
    """best (highest running median) and final (median of the last m) over the validated trained epochs."""
    values = [r.map50_95 for r in validated]
    epochs = [r.epoch for r in validated]
    m = min(window, len(values))
    numbers = dict(best=None, best_epoch=None, best_from_epoch=None, final=None, final_epoch=None,
                   final_from_epoch=None, final_over_best=None, final_spread=None, window=m or None, ptq=ptq,
                   collapse_ratio=collapse_ratio)
    if m == 0:
        return numbers
    medians = [(statistics.median(values[end - m + 1:end + 1]), end) for end in range(m - 1, len(values))]
    best, best_end = max(medians, key=lambda pair: pair[0])  # ties: the earliest window
    final = medians[-1][0]
    numbers.update(
        best=best, best_epoch=epochs[best_end], best_from_epoch=epochs[best_end - m + 1],
        final=final, final_epoch=epochs[-1], final_from_epoch=epochs[-m],
        final_over_best=final / best if best else None,
        final_spread=robust_spread(values[-m:]) if m > 1 else None,
    )
    return numbers


# Croux & Rousseeuw (1992), "Time-efficient algorithms for two highly robust estimators of scale", the
# small-sample factors that make 1.4826 × MAD unbiased for the std of normal noise; n / (n - 0.8) beyond 9.
# Without them 1.4826 × MAD of 3 values averages 0.67 σ (simulated), and evidence.py's 1.96 σ margin is
# cleared upward by a no-effect difference (one value minus a median of 3) in 10 % of seeds, not 2.5 %;
# with them in 6 % (the rest is the noise of a spread estimated from 3 values).
_MAD_SMALL_SAMPLE = {2: 1.196, 3: 1.495, 4: 1.363, 5: 1.206, 6: 1.200, 7: 1.140, 8: 1.129, 9: 1.107}


def robust_spread(values: Sequence[float]) -> float:
    """1.4826 × the median absolute deviation, scaled to be unbiased for the std of normal noise at this
    sample size, and untouched by one outlier in the window.

    A window that straddles a collapse (0.30, 0.06, 0.05) has a sample std of 0.14, which would call any
    difference noise; its median absolute deviation (0.01) keeps the noise of the values that agree.
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"a spread needs at least 2 values, got {n}")
    middle = statistics.median(values)
    small_sample = _MAD_SMALL_SAMPLE.get(n, n / (n - 0.8))
    return small_sample * 1.4826 * statistics.median(abs(v - middle) for v in values)


def _span(first: int | None, last: int | None) -> str:
    return f"epoch {last}" if first == last else f"median of epochs {first}-{last}"


def _verdict(numbers: dict, final_label: str, degenerate_map: float) -> Stability:
    """Apply the degenerate, collapse and below-PTQ rules to a complete run's best, final and PTQ values."""
    best, final, ptq, ratio = numbers["best"], numbers["final"], numbers["ptq"], numbers["collapse_ratio"]
    peak = max(v for v in (best, final, ptq) if v is not None)
    if peak <= degenerate_map:
        return Stability(
            status="completed-failed", failed_rules=["degenerate"],
            reason=f"degenerate: PTQ, best and final mAP50-95 are at most {peak:.4f} <= {degenerate_map:g}, "
                   "the model learned nothing",
            **numbers,
        )
    final_text = f"{final_label} mAP50-95 {final:.4f} ({_span(numbers['final_from_epoch'], numbers['final_epoch'])})"
    best_text = f"the best trained {best:.4f} ({_span(numbers['best_from_epoch'], numbers['best_epoch'])})"
    ptq_text = f"the PTQ {ptq:.4f} (epoch 0)" if ptq is not None else None
    # best can be 0 only after a fix lifted a dead QAT run above the degenerate level.
    share_of_best = f"{final / best:.0%} of {best_text}" if best > 0 else f"above {best_text}"
    share_of_ptq = (f"{final / ptq:.0%} of {ptq_text}" if ptq else None)
    failed = []
    if best > 0 and final < ratio * best:
        failed.append(("collapsed", share_of_best))
    if ptq is not None and final < ratio * ptq:
        failed.append(("fell_below_ptq", share_of_ptq))
    if failed:
        names = " and ".join("collapsed" if rule == "collapsed" else "fell below PTQ" for rule, _ in failed)
        shares = " and ".join(share for _, share in failed)
        return Stability(
            status="completed-failed", failed_rules=[rule for rule, _ in failed],
            reason=f"{names}: {final_text} is {shares}, below {ratio:.0%}", **numbers,
        )
    shares = share_of_best + (f" and {share_of_ptq}" if share_of_ptq else "")
    return Stability(status="completed-success", reason=f"stable: {final_text} is {shares}", **numbers)
