"""Stability verdicts: did a QAT run (and the QAT run + QC) finish, and did it keep its early peak?

The primary metric is mAP50-95(B). Rules, in the order they are applied:

1. `incomplete` — the run crashed (an error was recorded), diverged, produced a non-finite metric, or
   trained fewer distinct epochs than planned. Incomplete runs never count toward the gate.
2. `completed-failed` — degenerate (the best value is at or below `degenerate_map`: nothing was learned,
   so "collapse" would be meaningless) or collapsed (best > 0 and final < `collapse_ratio` × best).
3. `completed-success` otherwise.

Every verdict carries a reason a person can read without looking at the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qat_assets.core.summary import BNResult, EpochRecord, PostHocResult, QCResult, Stability

DEFAULT_COLLAPSE_RATIO = 0.5
DEFAULT_DEGENERATE_MAP = 0.01


def classify_qat(
    history: Sequence[EpochRecord],
    planned_epochs: int,
    *,
    diverged_at_epoch: int | None = None,
    error: str | None = None,
    collapse_ratio: float = DEFAULT_COLLAPSE_RATIO,
    degenerate_map: float = DEFAULT_DEGENERATE_MAP,
) -> Stability:
    """Classify a QAT run from its per-epoch history.

    Epoch 0 is the freshly quantized pretrained model (PTQ), not a training epoch: the epoch count checked
    against `planned_epochs` and the final value use trained epochs 1..N only. The best value includes
    epoch 0, because QAT that starts at the PTQ level and falls from it has collapsed from that early peak
    just the same. The numbers are reported even for incomplete runs so a reader sees how far it got.
    """
    if planned_epochs < 1:
        raise ValueError(f"planned_epochs must be at least 1, got {planned_epochs}")
    trained = sorted((r for r in history if r.epoch >= 1), key=lambda r: r.epoch)
    finite = [r for r in history if r.epoch >= 0 and math.isfinite(r.map50_95)]
    best_row = max(finite, key=lambda r: r.map50_95, default=None)
    final_row = trained[-1] if trained else None
    numbers = _numbers(
        best_row.map50_95 if best_row else None,
        best_row.epoch if best_row else None,
        final_row.map50_95 if final_row else None,
        final_row.epoch if final_row else None,
    )

    if error:
        return Stability(status="incomplete", reason=f"crashed: {error}", **numbers)
    if diverged_at_epoch is not None:
        return Stability(status="incomplete", reason=f"diverged at epoch {diverged_at_epoch} (non-finite loss)", **numbers)
    not_finite = [r.epoch for r in trained if not math.isfinite(r.map50_95)]
    if not_finite:
        return Stability(status="incomplete", reason=f"mAP50-95 is not finite at epoch {not_finite[0]}", **numbers)
    done = len({r.epoch for r in trained})
    if done < planned_epochs:
        return Stability(
            status="incomplete", reason=f"trained {done} of {planned_epochs} planned epochs (interrupted)", **numbers
        )
    return _verdict(numbers, "final", collapse_ratio, degenerate_map)


def classify_with_qc(
    qat: Stability,
    qc: QCResult | None,
    *,
    qc_error: str | None = None,
    collapse_ratio: float = DEFAULT_COLLAPSE_RATIO,
    degenerate_map: float = DEFAULT_DEGENERATE_MAP,
) -> Stability:
    """Classify the QAT run + QC outcome.

    QC is applied to the final (EMA) weights, so the QC'd mAP50-95 replaces the final value; it is reported
    at the QAT run's final epoch. The best value stays the QAT training peak, so `final_over_best` may exceed
    1 when QC lifts the final model above that peak. Incomplete when the QAT run is incomplete, or QC
    failed, is missing or produced a non-finite metric.
    """
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
    """A post-hoc fix of the final weights (`what`: QC, BN re-estimation): its mAP50-95 replaces the final value."""
    if qat.status == "incomplete":
        return qat.model_copy(update={"reason": f"QAT run incomplete: {qat.reason}"})
    numbers = {k: getattr(qat, k) for k in ("best", "best_epoch", "final", "final_epoch", "final_over_best")}
    if error:
        return Stability(status="incomplete", reason=f"{what} crashed: {error}", **numbers)
    if result is None:
        return Stability(status="incomplete", reason=f"{what} result is missing ({what} has not run)", **numbers)
    if not math.isfinite(result.map50_95_after):
        return Stability(status="incomplete", reason=f"{what} produced a non-finite mAP50-95", **numbers)
    numbers = _numbers(qat.best, qat.best_epoch, result.map50_95_after, qat.final_epoch)
    label = "QC'd final" if what == "QC" else f"final after {what}"
    return _verdict(numbers, label, collapse_ratio, degenerate_map)


def is_collapsed(stability: Stability) -> bool:
    """Complete, learned something, and fell below the collapse ratio of its best (not merely degenerate)."""
    return stability.status == "completed-failed" and stability.reason.startswith("collapsed")


def _numbers(best: float | None, best_epoch: int | None, final: float | None, final_epoch: int | None) -> dict:
    ratio = final / best if best and final is not None and math.isfinite(final) else None
    return dict(best=best, best_epoch=best_epoch, final=final, final_epoch=final_epoch, final_over_best=ratio)


def _verdict(numbers: dict, final_label: str, collapse_ratio: float, degenerate_map: float) -> Stability:
    """Apply the degenerate and collapse rules to a complete run's best and final values."""
    best, final = numbers["best"], numbers["final"]
    peak = max(best, final)
    if peak <= degenerate_map:
        return Stability(
            status="completed-failed",
            reason=f"degenerate: best mAP50-95 {peak:.4f} <= {degenerate_map:g}, the model learned nothing",
            **numbers,
        )
    # best can be 0 only after QC lifted a dead QAT run above the degenerate level.
    share = f"{final / best:.0%} of" if best > 0 else "above"
    story = (
        f"{final_label} mAP50-95 {final:.4f} (epoch {numbers['final_epoch']}) is {share} "
        f"the best {best:.4f} (epoch {numbers['best_epoch']})"
    )
    if best > 0 and final < collapse_ratio * best:
        return Stability(status="completed-failed", reason=f"collapsed: {story}, below {collapse_ratio:.0%}", **numbers)
    return Stability(status="completed-success", reason=f"stable: {story}", **numbers)
