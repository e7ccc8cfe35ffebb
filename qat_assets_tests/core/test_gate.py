import json

from qat_assets.core.gate import GateDecision, decide_gate
from qat_assets_tests.core.test_summary import make_summary


def full_set(**per_run):
    """Stable baseline and EMA runs, seeds 0 and 1, on both validation variants."""
    return [
        make_summary(variant=v, method=m, seed=s, **per_run)
        for v in ("yolo10n", "yolo10s") for m in ("baseline", "ema") for s in (0, 1)
    ]


def replace(runs, variant, partition_key, **changes):
    method, seed = partition_key.split("|")
    kept = [r for r in runs if (r.variant, r.partition_key) != (variant, partition_key)]
    return kept + [make_summary(variant=variant, method=method, seed=int(seed), **changes)]


def test_gate_passes_with_two_stable_comparable_seeds_per_variant():
    decision = decide_gate(full_set(), seeds=[0, 1])
    assert decision.passed, decision.reasons
    assert decision.per_variant["yolo10n"].good_seeds == [0, 1]
    assert decision.headline() == "gate PASSED: stable comparable ema+QC seeds yolo10n 2/2, yolo10s 2/2"
    assert decision.reasons[0].startswith("yolo10n: 2 of 2 required ema+QC seeds")


def test_no_summaries_fails_listing_every_missing_partition():
    decision = decide_gate([], seeds=[0, 1])
    assert not decision.passed
    for missing in ("yolo10n/stability_verdict ema|0 is missing", "yolo10n/stability_verdict ema|1 is missing",
                    "yolo10s/stability_verdict ema|0 is missing", "yolo10s/stability_verdict ema|1 is missing"):
        assert missing in decision.reasons
    assert decision.headline().startswith("gate NOT PASSED")


def test_missing_partition_is_named_by_variant_and_key():
    runs = [r for r in full_set() if (r.variant, r.partition_key) != ("yolo10s", "ema|1")]
    decision = decide_gate(runs, seeds=[0, 1])
    assert not decision.passed and decision.per_variant["yolo10n"].passed
    assert decision.per_variant["yolo10s"].problems == ["yolo10s/stability_verdict ema|1 is missing"]


def test_incomplete_run_does_not_count_and_says_why():
    runs = replace(full_set(), "yolo10n", "ema|0", error="worker killed (out of memory)")
    decision = decide_gate(runs, seeds=[0, 1])
    assert not decision.passed
    assert any("yolo10n/stability_verdict ema|0" in r and "incomplete" in r and "out of memory" in r
               for r in decision.reasons)


def test_collapsed_and_degenerate_runs_fail_the_gate():
    runs = replace(full_set(), "yolo10n", "ema|0", maps=(0.2, 0.3, 0.05), qc_after=0.06)
    runs = replace(runs, "yolo10s", "ema|1", maps=(0.0, 0.002, 0.001), qc_after=0.003)
    decision = decide_gate(runs, seeds=[0, 1])
    assert not decision.passed
    assert any("yolo10n/stability_verdict ema|0 (ema+QC) failed: collapsed" in r for r in decision.reasons)
    assert any("yolo10s/stability_verdict ema|1 (ema+QC) failed: degenerate" in r for r in decision.reasons)


def test_qc_can_rescue_a_collapsed_qat_run_and_with_qc_selects_the_outcome():
    runs = replace(full_set(), "yolo10n", "ema|0", maps=(0.2, 0.30, 0.31, 0.30, 0.10, 0.09),
                   qc_after=0.25)
    assert decide_gate(runs, seeds=[0, 1]).passed
    without_qc = decide_gate(runs, seeds=[0, 1], with_qc=False)
    assert not without_qc.passed and without_qc.method == "ema"
    assert any("ema|0 (ema) failed: collapsed" in r for r in without_qc.reasons)


def test_non_comparable_run_is_left_out():
    runs = replace(full_set(), "yolo10s", "ema|0", profile_fp="prof-other")
    decision = decide_gate(runs, seeds=[0, 1])
    assert not decision.passed and decision.per_variant["yolo10s"].good_seeds == [1]
    assert any(r.startswith("yolo10s/stability_verdict ema|0 is not comparable: training profile prof-other")
               for r in decision.reasons)


def test_thresholds_are_configurable():
    runs = replace(full_set(), "yolo10n", "ema|1", error="interrupted")
    assert decide_gate(runs, seeds=[0, 1], min_seeds=1).passed
    assert not decide_gate(runs, seeds=[0, 1], min_seeds=2).passed
    assert decide_gate(runs, seeds=[0, 1], variants=("yolo10s",)).passed
    assert decide_gate(runs, seeds=[0, 1], method="baseline").passed
    too_many = decide_gate(full_set(), seeds=[0, 1], min_seeds=3)
    assert not too_many.passed and "only 2 seeds are configured" in too_many.reasons[0]


def test_extra_seed_problems_are_reported_even_when_passing():
    runs = full_set() + [make_summary(variant=v, method="ema", seed=2, error="crashed") for v in ("yolo10n", "yolo10s")]
    decision = decide_gate(runs, seeds=[0, 1, 2])
    assert decision.passed
    assert any("yolo10n/stability_verdict ema|2" in r and "incomplete" in r for r in decision.reasons)


def test_decision_round_trips_through_json():
    decision = decide_gate(full_set()[:3], seeds=[0, 1])
    again = GateDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision and again.headline() == decision.headline()
