import random
import statistics

import pytest

from qat_assets.core.stability import classify_qat, classify_with_qc, is_collapsed, robust_spread
from qat_assets.core.summary import EpochRecord, QCResult
from qat_assets_tests.core.test_summary import history


def qc(before, after):
    return QCResult(map50_95_before=before, map50_95_after=after, map50_before=0.4, map50_after=0.4,
                    delta=after - before, max_fold_rel_diff=0.0, seconds=1.0)


def test_best_is_the_highest_running_median_and_final_the_median_of_the_last_three():
    verdict = classify_qat(history([0.30, 0.20, 0.30, 0.32, 0.31, 0.30]), planned_epochs=5)
    assert verdict.status == "completed-success" and verdict.failed_rules == []
    # running medians: epochs 1-3 0.30, 2-4 0.31, 3-5 0.31; the earliest of the tied windows is the best
    assert (verdict.best, verdict.best_from_epoch, verdict.best_epoch) == (0.31, 2, 4)
    assert (verdict.final, verdict.final_from_epoch, verdict.final_epoch) == (0.31, 3, 5)
    assert verdict.final_spread == pytest.approx(1.495 * 1.4826 * 0.01) and verdict.window == 3 and verdict.ptq == 0.30
    assert verdict.reason == ("stable: final mAP50-95 0.3100 (median of epochs 3-5) is 100% of the best trained "
                              "0.3100 (median of epochs 2-4) and 103% of the PTQ 0.3000 (epoch 0)")


def test_the_spread_of_the_last_window_ignores_one_outlier():
    # 1.4826 x MAD times Croux & Rousseeuw's small-sample factor (1.495 for 3 values, 1.196 for 2)
    assert robust_spread([0.30, 0.06, 0.05]) == pytest.approx(1.495 * 1.4826 * 0.01)
    assert robust_spread([0.2, 0.2, 0.2]) == 0.0
    assert robust_spread([0.1, 0.3]) == pytest.approx(1.196 * 1.4826 * 0.1)
    with pytest.raises(ValueError, match="at least 2 values"):
        robust_spread([0.3])


@pytest.mark.parametrize("m", [2, 3, 4, 5, 9, 12])
def test_the_spread_is_unbiased_for_the_std_of_normal_noise_at_small_windows(m):
    # Known answer: windows of m draws of N(0, 0.02^2) average a spread of 0.02. Without the small-sample
    # factor, 3 values average 0.67 x 0.02, and the evidence margin would be a third too narrow.
    rng = random.Random(m)
    spreads = [robust_spread([rng.gauss(0.3, 0.02) for _ in range(m)]) for _ in range(20000)]
    assert statistics.fmean(spreads) == pytest.approx(0.02, rel=0.03)


def test_the_ptq_epoch_is_not_a_peak_of_training():
    # PTQ 0.50 is higher than anything trained; the run kept its trained best and 56 % of PTQ: stable.
    verdict = classify_qat(history([0.50, 0.20, 0.30, 0.28]), planned_epochs=3)
    assert verdict.status == "completed-success"
    assert (verdict.best, verdict.best_from_epoch, verdict.final) == (0.28, 1, 0.28)


def test_a_one_epoch_lr_dip_that_recovers_is_not_a_failure():
    # The early LR shock: epoch 2 drops to 0.04 (below half of both the PTQ and the best), then recovers.
    dip = classify_qat(history([0.30, 0.31, 0.04, 0.30, 0.32, 0.33, 0.32]), planned_epochs=6)
    assert dip.status == "completed-success" and dip.final == 0.32
    # One bad validation inside the last three is outvoted too; two of them are a failure.
    assert classify_qat(history([0.30, 0.31, 0.30, 0.32, 0.04, 0.33]), planned_epochs=5).status == "completed-success"
    ends_in_it = classify_qat(history([0.30, 0.31, 0.30, 0.32, 0.04, 0.05]), planned_epochs=5)
    assert ends_in_it.status == "completed-failed" and ends_in_it.failed_rules == ["collapsed", "fell_below_ptq"]


def test_a_crash_in_epoch_one_that_stays_down_fell_below_ptq():
    verdict = classify_qat(history([0.30, 0.05, 0.06, 0.05, 0.06]), planned_epochs=4)
    assert verdict.status == "completed-failed" and verdict.failed_rules == ["fell_below_ptq"]
    assert not is_collapsed(verdict)  # it never had a peak to collapse from
    assert verdict.reason == ("fell below PTQ: final mAP50-95 0.0600 (median of epochs 2-4) is 20% of the PTQ "
                              "0.3000 (epoch 0), below 50%")


def test_the_seed_reports_collapse_is_still_a_collapse():
    # yolov10m scratch W4A16: PTQ 0.128, a peak of 0.226 at epoch 29 among close neighbours, 0.012 at epoch 76.
    rise = [0.128] + [0.05 + 0.15 * e / 27 for e in range(1, 28)]  # epochs 0..27
    peak = [0.215, 0.226, 0.218]  # epochs 28..30
    fall = [0.20 - 0.19 * e / 42 for e in range(1, 43)]  # epochs 31..72, down to 0.01
    tail = [0.013, 0.011, 0.0125, 0.012]  # epochs 73..76
    verdict = classify_qat(history(rise + peak + fall + tail), planned_epochs=76)
    assert verdict.status == "completed-failed" and is_collapsed(verdict)
    assert (verdict.best, verdict.best_from_epoch, verdict.best_epoch) == (0.218, 28, 30)
    assert verdict.final == 0.012 and verdict.final_over_best == pytest.approx(0.012 / 0.218)
    assert verdict.reason.startswith("collapsed and fell below PTQ: final mAP50-95 0.0120 (median of epochs 74-76)")


def test_a_single_validation_spike_or_drop_does_not_decide():
    spike = classify_qat(history([0.30, 0.15, 0.16, 0.40, 0.17, 0.16, 0.16]), planned_epochs=6)
    assert spike.best == 0.17 and spike.status == "completed-success"
    last_only = classify_qat(history([0.20, 0.30, 0.31, 0.30, 0.31, 0.012]), planned_epochs=5)
    assert last_only.final == 0.30 and last_only.status == "completed-success"
    # With a window of one, best and final are single validations again (the seed's "final < 0.5 x best").
    single = classify_qat(history([0.20, 0.30, 0.31, 0.30, 0.31, 0.012]), planned_epochs=5, window=1)
    assert (single.best, single.final) == (0.31, 0.012) and is_collapsed(single)


def test_unvalidated_epochs_are_skipped_by_the_window():
    # Sparse validation: epochs 1, 3, 5 trained without a validation.
    records = history([0.30, 0.0, 0.31, 0.0, 0.33, 0.0, 0.30])
    sparse = [r if r.epoch % 2 == 0 else EpochRecord.model_construct(**{**r.model_dump(), "map50_95": None})
              for r in records]
    verdict = classify_qat(sparse, planned_epochs=6)
    assert verdict.status == "completed-success"
    assert (verdict.best, verdict.best_from_epoch, verdict.best_epoch, verdict.final_from_epoch) == (0.31, 2, 6, 2)
    blind = [sparse[0]] + [EpochRecord.model_construct(**{**r.model_dump(), "map50_95": None}) for r in sparse[1:]]
    verdict = classify_qat(blind, planned_epochs=6)
    assert verdict.status == "incomplete" and verdict.reason == "none of the 6 trained epochs was validated"


def test_fewer_trained_epochs_shrink_the_window():
    verdict = classify_qat(history([0.30, 0.28, 0.32]), planned_epochs=2)
    assert verdict.window == 2 and verdict.best == verdict.final == pytest.approx(0.30)
    one = classify_qat(history([0.30, 0.28]), planned_epochs=1)
    assert one.window == 1 and one.final == 0.28 and one.final_spread is None
    assert "(epoch 1)" in one.reason


def test_collapse_ratio_and_window_are_validated_and_configurable():
    runs = history([0.10, 0.30, 0.31, 0.30, 0.20, 0.20, 0.21])  # final 0.20 is 67 % of best 0.30
    assert classify_qat(runs, 6).status == "completed-success"
    assert classify_qat(runs, 6, collapse_ratio=0.8).failed_rules == ["collapsed"]
    with pytest.raises(ValueError, match="window must be at least 1"):
        classify_qat(runs, 6, window=0)


def test_degenerate_run_is_completed_failed():
    verdict = classify_qat(history([0.0, 0.004, 0.001]), planned_epochs=2)
    assert verdict.status == "completed-failed" and verdict.failed_rules == ["degenerate"]
    assert verdict.reason.startswith("degenerate")
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
    assert (verdict.best, verdict.final_epoch) == (pytest.approx(0.25), 2)
    only_ptq = classify_qat(history([0.1]), planned_epochs=3)
    assert only_ptq.status == "incomplete" and only_ptq.final is None and "trained 0 of 3" in only_ptq.reason


def test_crashed_run_is_incomplete_with_the_error():
    verdict = classify_qat(history([0.1, 0.2, 0.3]), planned_epochs=2, error="CUDA out of memory")
    assert verdict.status == "incomplete" and verdict.reason == "crashed: CUDA out of memory"


def test_qc_moves_the_windowed_final_by_its_own_paired_delta():
    collapsed = classify_qat(history([0.1, 0.30, 0.31, 0.12, 0.11]), planned_epochs=4)
    assert collapsed.failed_rules == ["collapsed"] and collapsed.best == 0.30 and collapsed.final == 0.12
    rescued = classify_with_qc(collapsed, qc(0.11, 0.20))  # measured on the last weights: +0.09
    assert rescued.status == "completed-success" and rescued.failed_rules == []
    assert (rescued.best, rescued.final, rescued.final_epoch, rescued.ptq) == (0.30, pytest.approx(0.21), 4, 0.1)
    assert rescued.final_spread == collapsed.final_spread
    assert rescued.reason.startswith("stable: final + QC's delta mAP50-95 0.2100 (median of epochs 2-4)")
    # A QC that changed nothing (rejected: delta 0) leaves the run's final exactly, whatever the last epoch read.
    assert classify_with_qc(collapsed, qc(0.11, 0.11)).final == collapsed.final
    stable = classify_qat(history([0.1, 0.30, 0.28]), planned_epochs=2)
    assert classify_with_qc(stable, qc(0.28, 0.10)).failed_rules == ["collapsed"]
    lifted = classify_with_qc(stable, qc(0.28, 0.33))
    assert lifted.final_over_best == pytest.approx((0.29 + 0.05) / 0.29)
    below_ptq = classify_with_qc(classify_qat(history([0.5, 0.30, 0.28]), planned_epochs=2), qc(0.28, 0.2))
    assert below_ptq.failed_rules == ["fell_below_ptq"]


def test_qc_outcome_is_incomplete_when_qat_or_qc_is():
    incomplete = classify_qat(history([0.1, 0.2]), planned_epochs=3)
    verdict = classify_with_qc(incomplete, qc(0.2, 0.3))
    assert verdict.status == "incomplete" and verdict.reason.startswith("QAT run incomplete: trained 1 of 3")
    stable = classify_qat(history([0.1, 0.30, 0.28]), planned_epochs=2)
    assert "QC result is missing" in classify_with_qc(stable, None).reason
    assert classify_with_qc(stable, None, qc_error="boom").reason == "QC crashed: boom"
    assert classify_with_qc(stable, qc(0.28, float("nan"))).status == "incomplete"


def recorded(maps_by_epoch: dict[int, float], epochs: int, interval: int, final_epochs: int) -> list[EpochRecord]:
    """A trajectory's history as the trainer records it at a sparse cadence, read back as the verdict reads it:
    an unvalidated epoch keeps its losses and has metrics None."""
    from qat_assets.core.qat import validated_qat_epochs

    validated = validated_qat_epochs(epochs, interval, final_epochs)
    rows = []
    for epoch, value in sorted(maps_by_epoch.items()):
        shown = epoch == 0 or validated(epoch)
        metrics = {"map50_95": value, "map50": min(1.0, 1.5 * value), "precision": 0.5, "recall": 0.5}
        rows.append({"epoch": epoch, **(metrics if shown else dict.fromkeys(metrics)), "box_loss": 1.0,
                     "validation_seconds": 2.0 if shown else None})
    return [EpochRecord(**{k: v for k, v in row.items() if k in EpochRecord.model_fields}) for row in rows]


def test_a_sparse_cadence_judges_the_validated_epochs_only_and_ignores_an_unvalidated_dip():
    # 7 epochs, every 2nd validated and the last 3: epochs 2, 4, 5, 6, 7. The model dips hard in epochs 1 and 3,
    # which trained without a validation: a history that counted them (as 0, or as the last value) would
    # move the best and, here, its window; the verdict reads 2, 4, 5, 6, 7 and nothing else.
    truth = {0: 0.30, 1: 0.02, 2: 0.31, 3: 0.01, 4: 0.33, 5: 0.32, 6: 0.30, 7: 0.31}
    sparse = recorded(truth, epochs=7, interval=2, final_epochs=3)
    assert [r.epoch for r in sparse if r.map50_95 is not None] == [0, 2, 4, 5, 6, 7]
    verdict = classify_qat(sparse, planned_epochs=7)
    assert verdict.status == "completed-success"
    # running medians of 3 over (0.31, 0.33, 0.32, 0.30, 0.31): 0.32 (epochs 2-5), 0.32 (4-6), 0.31 (5-7)
    assert (verdict.best, verdict.best_from_epoch, verdict.best_epoch) == (0.32, 2, 5)
    assert (verdict.final, verdict.final_from_epoch, verdict.final_epoch) == (0.31, 5, 7)
    validated_only = [r for r in sparse if r.map50_95 is not None]
    assert classify_qat(validated_only, planned_epochs=7).model_dump() == {
        **verdict.model_dump(), "status": "incomplete", "reason": "trained 5 of 7 planned epochs (interrupted)"}
    dense = classify_qat(history(list(truth.values())), planned_epochs=7)
    assert (dense.best, dense.best_from_epoch, dense.best_epoch) == (0.32, 3, 5)  # validating every epoch


def test_a_sparse_cadence_with_fewer_validations_than_the_window_shrinks_it():
    # 4 epochs at interval 4 and a 1-epoch final window: only epoch 4 is validated, so m = 1 < 3.
    verdict = classify_qat(recorded({0: 0.30, 1: 0.10, 2: 0.10, 3: 0.10, 4: 0.29}, 4, 4, 1), planned_epochs=4)
    assert verdict.status == "completed-success" and verdict.window == 1
    assert (verdict.best, verdict.final, verdict.final_epoch, verdict.final_spread) == (0.29, 0.29, 4, None)
    # 3 epochs at interval 2: epochs 2 and 3, m = 2. The peak in unvalidated epoch 1 is not seen, so this run
    # fell below PTQ but did not collapse from its (seen) best.
    two = classify_qat(recorded({0: 0.30, 1: 0.31, 2: 0.10, 3: 0.12}, 3, 2, 1), planned_epochs=3)
    assert two.window == 2 and (two.best, two.final) == pytest.approx((0.11, 0.11))
    assert two.status == "completed-failed" and two.failed_rules == ["fell_below_ptq"]
