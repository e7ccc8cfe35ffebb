"""Evidence verdicts, noise floor, paired rows and the gate's evidence check, from real classifier outputs."""

import statistics

import pytest

from qat_assets.core.comparison import build_comparison
from qat_assets.core.evidence import evidence_verdict, noise_floor
from qat_assets.core.gate import decide_gate, evidence_check_outcome
from qat_assets_tests.core.test_summary import make_summary

STABLE = (0.20, 0.30, 0.32, 0.31)
COLLAPSED = (0.20, 0.30, 0.12, 0.05)


def runs(baseline_maps, ema_qc_after, seeds=(0, 1, 2), variant="yolo10n"):
    """Per seed a baseline run with the given history and an EMA run (stable QAT) with the given QC result."""
    out = []
    for seed in seeds:
        out.append(make_summary(variant=variant, method="baseline", seed=seed, maps=baseline_maps[seed],
                                qc_after=0.06, bn_after=0.07))
        out.append(make_summary(variant=variant, method="ema", seed=seed, maps=STABLE, qc_after=ema_qc_after[seed],
                                bn_after=0.30))
    return out


def verdict_of(summaries):
    return build_comparison(summaries).variants[0].evidence


def test_prevented_counts_the_seeds_where_the_baseline_collapsed_and_ema_qc_did_not():
    verdict = verdict_of(runs([COLLAPSED, COLLAPSED, STABLE], [0.33, 0.33, 0.33]))
    assert verdict.kind == "prevented" and verdict.informative
    assert verdict.text == "EMA+QC prevented a collapse the baseline showed (2/3 seeds)"


def test_a_baseline_that_never_collapsed_is_uninformative():
    verdict = verdict_of(runs([STABLE] * 3, [0.33] * 3))
    assert verdict.kind == "uninformative" and not verdict.informative
    assert verdict.text == "uninformative: the baseline did not collapse (0/3 seeds)"


def test_ema_qc_collapsing_wherever_the_baseline_did_is_collapsed_too():
    verdict = verdict_of(runs([COLLAPSED, STABLE, STABLE], [0.05, 0.33, 0.33]))
    assert verdict.kind == "collapsed_too" and verdict.text.startswith("EMA+QC collapsed too")


def test_incomplete_or_missing_partners_do_not_count():
    summaries = runs([COLLAPSED] * 3, [0.33] * 3)
    summaries = [s for s in summaries if (s.method, s.seed) != ("ema", 2)]  # seed 2 has no EMA run
    summaries.append(make_summary(method="ema", seed=2, maps=(0.2, 0.3), planned_epochs=3))  # incomplete
    verdict = verdict_of(summaries)
    assert verdict.pairs == 2 and verdict.text.endswith("(2/2 seeds)")
    assert evidence_verdict("yolo10n", []).kind == "uninformative"


def test_noise_floor_is_the_largest_seed_spread_or_the_identical_run_spread_when_larger():
    floor = noise_floor({"a": [0.30, 0.32], "b": [0.30, 0.40], "c": [0.5]})
    assert floor.seed_spread == pytest.approx(statistics.stdev([0.30, 0.40])) and floor.seed_spread_method == "b"
    assert floor.is_real(0.08) is True and floor.is_real(-0.05) is False
    wider = noise_floor({"a": [0.30, 0.32]}, identical_run_spread=0.02, identical_run_source="4 runs")
    assert wider.value == 0.02 and "identical-run spread 0.0200 (4 runs)" in wider.describe()
    unknown = noise_floor({"a": [0.3]})
    assert unknown.value is None and unknown.is_real(0.5) is None and "no difference is called real" in unknown.describe()


def test_paired_rows_pair_every_outcome_with_the_baseline_of_its_seed():
    comparison = build_comparison(runs([COLLAPSED, COLLAPSED, STABLE], [0.33, 0.34, 0.35]), identical_run_spread=0.001)
    variant = comparison.variants[0]
    assert {r.method for r in variant.rows} == {"baseline", "baseline+QC", "baseline+BN", "ema", "ema+QC", "ema+BN"}
    pair = next(p for p in variant.paired if p.seed == 1 and p.method == "ema+QC")
    assert pair.baseline_final == 0.05 and pair.final == 0.34 and pair.difference == pytest.approx(0.29)
    assert pair.real is True  # 0.29 is far above the seed spread of any method
    seed2 = next(p for p in variant.paired if p.seed == 2 and p.method == "ema")
    assert seed2.difference == pytest.approx(0.0) and seed2.real is False
    assert len(variant.paired) == 3 * 5
    bn = next(r for r in variant.rows if r.method == "baseline+BN" and r.seed == 0)
    assert bn.final == 0.07 and bn.bn_delta == pytest.approx(0.02) and bn.status == "completed-failed"
    ema_qc = next(a for a in variant.aggregates if a.method == "ema+QC")
    baseline_finals = [0.05, 0.05, 0.31]
    assert ema_qc.mean_paired_difference == pytest.approx(statistics.fmean([0.33, 0.34, 0.35]) - statistics.fmean(baseline_finals))

    markdown = comparison.to_markdown()
    assert "**Evidence: EMA+QC prevented a collapse the baseline showed (2/3 seeds).**" in markdown
    assert "| 1 | ema+QC | 0.3400 | 1.06 | 0.0500 | 0.17 | +0.2900 | yes |" in markdown
    assert "Noise floor" in markdown and comparison.evidence_lines()[0].startswith("yolo10n: EMA+QC prevented")


def test_gate_carries_the_evidence_and_can_require_it():
    both = runs([STABLE] * 2, [0.33] * 2, seeds=(0, 1)) + runs([STABLE] * 2, [0.33] * 2, seeds=(0, 1), variant="yolo10s")
    decision = decide_gate(both, seeds=[0, 1])
    assert decision.passed and not decision.informative
    assert decision.evidence["yolo10s"].text == "uninformative: the baseline did not collapse (0/2 seeds)"
    check = evidence_check_outcome(decision)
    assert not check.passed and "the gate PASSED on evidence that cannot say no" in check.description

    strict = decide_gate(both, seeds=[0, 1], require_informative=True)
    assert not strict.passed and "gate_require_informative" in strict.reasons[-1]

    informative = runs([COLLAPSED] * 2, [0.33] * 2, seeds=(0, 1))
    informative += runs([COLLAPSED] * 2, [0.33] * 2, seeds=(0, 1), variant="yolo10s")
    decision = decide_gate(informative, seeds=[0, 1], require_informative=True)
    assert decision.passed and decision.informative and evidence_check_outcome(decision).passed
    assert type(decision).from_dict(decision.to_dict()) == decision
