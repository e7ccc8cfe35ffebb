import pytest

from qat_assets.core.stability import classify_qat, classify_with_qc
from qat_assets.core.summary import QCResult
from qat_assets_tests.core.test_summary import history


def qc(before, after):
    return QCResult(map50_95_before=before, map50_95_after=after, map50_before=0.4, map50_after=0.4,
                    delta=after - before, max_fold_rel_diff=0.0, seconds=1.0)


def test_stable_run_succeeds_and_the_ptq_epoch_counts_as_a_peak():
    # PTQ (epoch 0) is higher than anything trained: it is the best, and 0.28 is still above half of it.
    verdict = classify_qat(history([0.50, 0.20, 0.30, 0.28]), planned_epochs=3)
    assert verdict.status == "completed-success"
    assert (verdict.best, verdict.best_epoch, verdict.final, verdict.final_epoch) == (0.50, 0, 0.28, 3)
    assert verdict.final_over_best == pytest.approx(0.28 / 0.50)
    assert "stable" in verdict.reason


def test_falling_from_the_ptq_level_and_staying_down_is_a_collapse():
    verdict = classify_qat(history([0.37, 0.10, 0.11, 0.10]), planned_epochs=3)
    assert verdict.status == "completed-failed" and "collapsed" in verdict.reason and verdict.best_epoch == 0


def test_early_peak_then_collapse_is_completed_failed():
    maps = [0.128] + [0.226 if e == 29 else 0.15 for e in range(1, 76)] + [0.012]
    verdict = classify_qat(history(maps), planned_epochs=76)
    assert verdict.status == "completed-failed"
    assert verdict.best_epoch == 29 and verdict.final_epoch == 76
    assert verdict.reason.startswith("collapsed") and "0.2260" in verdict.reason and "0.0120" in verdict.reason


def test_collapse_ratio_is_configurable():
    runs = history([0.1, 0.30, 0.20])  # final is 67% of best
    assert classify_qat(runs, 2).status == "completed-success"
    assert classify_qat(runs, 2, collapse_ratio=0.8).status == "completed-failed"


def test_degenerate_run_is_completed_failed():
    verdict = classify_qat(history([0.0, 0.004, 0.001]), planned_epochs=2)
    assert verdict.status == "completed-failed" and verdict.reason.startswith("degenerate")
    assert classify_qat(history([0.0, 0.004, 0.003]), 2, degenerate_map=0.001).status == "completed-success"


def test_diverged_run_is_incomplete():
    verdict = classify_qat(history([0.1, 0.2, 0.3]), planned_epochs=2, diverged_at_epoch=2)
    assert verdict.status == "incomplete" and "diverged at epoch 2" in verdict.reason


def test_non_finite_metric_is_incomplete():
    verdict = classify_qat(history([0.1, 0.2, float("nan")]), planned_epochs=2)
    assert verdict.status == "incomplete" and "not finite at epoch 2" in verdict.reason
    assert verdict.best == 0.2


def test_fewer_epochs_than_planned_is_incomplete_but_keeps_its_numbers():
    verdict = classify_qat(history([0.1, 0.2, 0.3]), planned_epochs=5)
    assert verdict.status == "incomplete" and "trained 2 of 5 planned epochs" in verdict.reason
    assert (verdict.best, verdict.final_epoch) == (0.3, 2)
    only_ptq = classify_qat(history([0.1]), planned_epochs=3)
    assert only_ptq.status == "incomplete" and only_ptq.final is None and "trained 0 of 3" in only_ptq.reason


def test_crashed_run_is_incomplete_with_the_error():
    verdict = classify_qat(history([0.1, 0.2, 0.3]), planned_epochs=2, error="CUDA out of memory")
    assert verdict.status == "incomplete" and verdict.reason == "crashed: CUDA out of memory"


def test_qc_replaces_the_final_value():
    collapsed = classify_qat(history([0.1, 0.30, 0.12]), planned_epochs=2)
    assert collapsed.status == "completed-failed"
    rescued = classify_with_qc(collapsed, qc(0.12, 0.20))
    assert rescued.status == "completed-success"
    assert (rescued.best, rescued.final, rescued.final_epoch) == (0.30, 0.20, 2)
    assert "QC'd final" in rescued.reason
    stable = classify_qat(history([0.1, 0.30, 0.28]), planned_epochs=2)
    assert classify_with_qc(stable, qc(0.28, 0.10)).status == "completed-failed"
    lifted = classify_with_qc(stable, qc(0.28, 0.33))
    assert lifted.final_over_best == pytest.approx(1.1)


def test_qc_outcome_is_incomplete_when_qat_or_qc_is():
    incomplete = classify_qat(history([0.1, 0.2]), planned_epochs=3)
    verdict = classify_with_qc(incomplete, qc(0.2, 0.3))
    assert verdict.status == "incomplete" and verdict.reason.startswith("QAT run incomplete: trained 1 of 3")
    stable = classify_qat(history([0.1, 0.30, 0.28]), planned_epochs=2)
    assert "QC result is missing" in classify_with_qc(stable, None).reason
    assert classify_with_qc(stable, None, qc_error="boom").reason == "QC crashed: boom"
    assert classify_with_qc(stable, qc(0.28, float("nan"))).status == "incomplete"
