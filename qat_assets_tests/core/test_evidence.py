"""Evidence verdicts judged against the baseline of each seed, from recorded histories and real classifiers."""

import pytest

from qat_assets.core.comparison import build_comparison
from qat_assets.core.evidence import SeedPair, evidence_verdict, judge_seed, paired_margin
from qat_assets.core.gate import decide_gate, evidence_check_outcome
from qat_assets_tests.core.test_summary import make_summary

# Histories (epoch 0 = PTQ) judged with the default window of 3 validations.
STABLE = (0.20, 0.30, 0.32, 0.31, 0.31, 0.30)  # best 0.31, final 0.31
COLLAPSED = (0.20, 0.30, 0.31, 0.30, 0.06, 0.05)  # best 0.30 (epochs 1-3), final 0.06: the line is 0.15
NOISY_COLLAPSE = (0.20, 0.30, 0.31, 0.30, 0.02, 0.14, 0.10)  # best 0.30, final 0.10, last-window spread 0.089
# A scratch-like start (PTQ near 0): the baseline peaks at 0.21 and collapses; the EMA copy lags and never rises.
SCRATCH_BASELINE = (0.01, 0.20, 0.226, 0.21, 0.02, 0.012)  # best 0.21, final 0.02: the line is 0.105
SCRATCH_LAGGING_EMA = (0.01, 0.015, 0.02, 0.025, 0.03, 0.03)  # best 0.03, final 0.03: "stable" on its own terms


def runs(baseline_maps, ema_qc_after, ema_bn_after=None, seeds=(0, 1, 2), variant="yolo10n", ema_maps=STABLE):
    """Per seed a baseline run with the given history and an EMA run with the given QC and BN results."""
    out = []
    for seed in seeds:
        out.append(make_summary(variant=variant, method="baseline", seed=seed, maps=baseline_maps[seed],
                                qc_after=0.06, bn_after=0.07))
        out.append(make_summary(variant=variant, method="ema", seed=seed, maps=ema_maps, qc_after=ema_qc_after[seed],
                                bn_after=(ema_bn_after or [0.30] * len(seeds))[seed]))
    return out


def verdict_of(summaries):
    return build_comparison(summaries).variants[0].evidence


def test_ema_qc_above_the_baselines_line_prevented_the_collapse():
    verdict = verdict_of(runs([COLLAPSED] * 3, [0.33, 0.34, 0.35]))
    assert verdict.kind == "prevented" and verdict.informative
    assert (verdict.prevented, verdict.baseline_collapsed, verdict.p_sign_test) == (3, 3, 0.125)
    assert verdict.text.startswith("EMA+QC prevented a collapse the baseline showed: prevented in 3/3 seeds whose "
                                   "baseline collapsed (one-sided sign test p = 0.125)")
    seed = verdict.seeds[0]
    assert (seed.baseline_best, seed.line, seed.baseline_final, seed.outcome) == (0.30, 0.15, 0.06, "prevented")
    assert seed.margin == pytest.approx(1.96 * 1.495 * 1.4826 * 0.01)  # baseline spread 0.0222, EMA's last window agrees


def test_ema_qc_stable_against_its_own_low_peak_but_below_the_baselines_line_collapsed_too():
    summaries = runs([SCRATCH_BASELINE] * 2, [0.032, 0.031], seeds=(0, 1), ema_maps=SCRATCH_LAGGING_EMA)
    ema_qc = next(s for s in summaries if s.method == "ema").stability_qat_qc
    assert ema_qc.status == "completed-success"  # 0.032 is above half of its own best 0.03 and of PTQ
    verdict = verdict_of(summaries)
    assert verdict.kind == "collapsed_too" and verdict.prevented == 0
    assert [s.outcome for s in verdict.seeds] == ["collapsed_too"] * 2 and verdict.seeds[0].line == pytest.approx(0.105)
    assert verdict.text == ("EMA+QC collapsed too: below the collapse line of the baseline's best in 2/2 seeds whose "
                            "baseline collapsed")
    # The gate counts that run as stable, so its pass would prove nothing: the evidence says so.
    both = summaries + runs([SCRATCH_BASELINE] * 2, [0.032, 0.031], seeds=(0, 1), variant="yolo10s",
                            ema_maps=SCRATCH_LAGGING_EMA)
    decision = decide_gate(both, seeds=[0, 1])
    assert decision.passed and decision.evidence["yolo10n"].kind == "collapsed_too"


def test_above_the_line_but_not_beyond_the_paired_uncertainty_is_within_noise():
    verdict = verdict_of(runs([NOISY_COLLAPSE] * 3, [0.16, 0.16, 0.16]))
    assert [s.outcome for s in verdict.seeds] == ["within_noise"] * 3  # 0.16 - 0.10 < 1.96 x 0.089
    assert verdict.kind == "inconclusive" and verdict.prevented == 0


def test_the_variant_verdict_needs_a_majority_of_the_seeds_whose_baseline_collapsed():
    half = verdict_of(runs([COLLAPSED] * 2, [0.33, 0.05], seeds=(0, 1)))
    assert (half.kind, half.prevented, half.collapsed_too) == ("inconclusive", 1, 1)  # 1 of 2 is no majority
    one_of_three = verdict_of(runs([COLLAPSED] * 3, [0.33, 0.05, 0.05]))
    assert (one_of_three.kind, one_of_three.prevented, one_of_three.collapsed_too) == ("collapsed_too", 1, 2)
    assert "prevented in 1/3 seeds" in one_of_three.text and "p = 0.875" in one_of_three.text
    split = verdict_of(runs([COLLAPSED, COLLAPSED, NOISY_COLLAPSE, STABLE], [0.33, 0.05, 0.16, 0.33],
                            seeds=(0, 1, 2, 3), ema_bn_after=[0.3] * 4))
    assert split.kind == "inconclusive" and split.pairs == 4 and split.baseline_collapsed == 3
    assert split.text == ("inconclusive, no majority of seeds: prevented in 1/3 seeds whose baseline collapsed "
                          "(one-sided sign test p = 0.875), collapsed too in 1, within noise in 1 (the baseline "
                          "collapsed in 3 of 4 complete seeds)")


def test_qc_is_credited_only_where_it_beats_bn_reestimation_beyond_the_paired_uncertainty():
    credited = verdict_of(runs([COLLAPSED] * 3, [0.33, 0.34, 0.35], ema_bn_after=[0.30, 0.30, 0.30]))
    assert credited.qc_beyond_bn.differences == pytest.approx([0.03, 0.04, 0.05]) and credited.qc_beyond_bn.positive
    assert "; QC is credited: it beats BN re-estimation of the same weights by +0.0400 (95 % CI +0.0152 to +0.0648)" in credited.text
    # QC ahead on average (+0.02) but not beyond its interval (d = 0.05, -0.01, 0.02: SE 0.017, t 4.303)
    ahead = verdict_of(runs([COLLAPSED] * 3, [0.33, 0.34, 0.35], ema_bn_after=[0.28, 0.35, 0.33]))
    assert ahead.qc_beyond_bn.mean == pytest.approx(0.02) and ahead.qc_beyond_bn.ci_low < 0
    assert "QC is not credited" in ahead.text
    recalibration = verdict_of(runs([COLLAPSED] * 3, [0.33, 0.34, 0.35], ema_bn_after=[0.34, 0.33, 0.35]))
    assert recalibration.kind == "prevented" and not recalibration.qc_beyond_bn.real
    assert "QC is not credited" in recalibration.text and "EMA with recalibration did the work" in recalibration.text


def test_the_margin_adds_both_runs_spreads_in_quadrature_and_an_unknown_one_proves_nothing():
    baseline = make_summary(method="baseline", maps=COLLAPSED).stability_qat
    ema_qc = make_summary(method="ema", maps=STABLE, qc_after=0.33).stability_qat_qc
    noisy = ema_qc.model_copy(update={"final_spread": 0.04})
    assert paired_margin(baseline.model_copy(update={"final_spread": 0.03}), noisy) == pytest.approx(1.96 * 0.05)
    assert judge_seed(SeedPair(seed=0, baseline=baseline, ema_qc=ema_qc)).outcome == "prevented"
    # EMA+QC far above the line and the baseline's final, but one run's noise is unknown: not "prevented"
    unknown = judge_seed(SeedPair(seed=0, baseline=baseline, ema_qc=ema_qc.model_copy(update={"final_spread": None})))
    assert unknown.margin is None and unknown.outcome == "within_noise"


def test_a_baseline_that_never_collapsed_is_uninformative():
    verdict = verdict_of(runs([STABLE] * 3, [0.33] * 3))
    assert verdict.kind == "uninformative" and not verdict.informative
    assert verdict.text == "uninformative: the baseline did not collapse (0/3 seeds)"
    # Falling below PTQ alone is not the early-peak collapse the question is about.
    below_ptq = verdict_of(runs([(0.40, 0.10, 0.11, 0.10)] * 2, [0.33] * 2, seeds=(0, 1)))
    assert below_ptq.kind == "uninformative"


def test_incomplete_or_missing_partners_do_not_count():
    summaries = runs([COLLAPSED] * 3, [0.33] * 3)
    summaries = [s for s in summaries if (s.method, s.seed) != ("ema", 2)]  # seed 2 has no EMA run
    summaries.append(make_summary(method="ema", seed=2, maps=(0.2, 0.3), planned_epochs=3))  # incomplete
    verdict = verdict_of(summaries)
    assert verdict.pairs == 2 and "prevented in 2/2 seeds" in verdict.text
    assert evidence_verdict("yolo10n", []).kind == "uninformative"
    one = make_summary(method="baseline", maps=COLLAPSED)
    assert evidence_verdict("v", [SeedPair(seed=0, baseline=one.stability_qat, ema_qc=one.stability_qat_qc)]).pairs == 1


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
    assert decision.evidence["yolo10n"].kind == "prevented" and decision.evidence["yolo10n"].qc_beyond_bn.n == 2
    assert type(decision).from_dict(decision.to_dict()) == decision


def test_the_report_shows_the_grid_the_paired_intervals_and_the_per_seed_verdicts():
    markdown = build_comparison(runs([COLLAPSED] * 3, [0.33, 0.34, 0.35], ema_bn_after=[0.30, 0.30, 0.30])).to_markdown()
    assert "|  | nothing | +BN | +QC |" in markdown
    assert "| ema | 0.3100 ± 0.0000 (3, 0 failed) | 0.3000 ± 0.0000 (3, 0 failed) | 0.3400 ± 0.0100 (3, 0 failed) |" in markdown
    # mean 0.04, SE 0.01/sqrt(3), t(0.975, 2) = 4.303; exact two-sided sign flip over 3 seeds: 2/8
    assert "| QC beyond BN: ema+QC - ema+BN | 3 | +0.0400 | 0.0058 | +0.0152 to +0.0648 | 0.250 | yes |" in markdown
    assert "| 0 | 0.3000 | 0.1500 | 0.0600 | 0.3300 | 0.0434 | prevented |" in markdown
    assert "| EMA alone: ema - baseline | 3 | +0.2500 |" in markdown  # STABLE's 0.31 - COLLAPSED's 0.06
    assert "| 0 | ema+QC | 0.3300 | 1.06 | 0.0600 | 0.20 | +0.2700 | 0.0434 | yes |" in markdown
    assert ("With 3 seed(s) the smallest attainable exact p is 0.125 one-sided and 0.25 two-sided; one-sided "
            "p < 0.05 needs 5 seeds (`QAT_SEEDS=0,1,2,3,4`), two-sided 6.") in markdown
