"""What the runs say about the question: one verdict per variant, judged seed by seed against the baseline.

The project asks whether EMA + QC prevents the early-peak collapse of W4A16 QAT. That needs a contrast: a
baseline that collapses and an EMA+QC run of the same seed that does not. Every seed whose baseline and
EMA+QC runs are both complete and comparable is a pair; in a pair whose baseline collapsed (the
"collapsed" rule of `stability.py`, a peak then a fall; falling below PTQ alone is not that failure):

- "prevented": EMA+QC's final is at least `collapse_ratio` × the baseline's best in that seed (the very
  line the baseline fell below, not EMA+QC's own peak, which may never have risen), and above the
  baseline's final by more than the paired uncertainty;
- "collapsed too": EMA+QC's final is below that line;
- "within noise": above the line, but not above the baseline's final by more than the uncertainty.

The paired uncertainty of one seed is 1.96 × √(s_b² + s_e²), where s is each run's `final_spread`, the
robust spread of its last m validations: a run's own validation-to-validation noise at its end. It is
unknown (and so nothing is "prevented") when a run has a single trained validation. It does not see the
sampling noise of the fixed val set itself. The paired bootstrap over val images that does
(core/within_seed.py) covers the final EMA and live weights only, not EMA+QC, so the report shows it beside
EMA − baseline and this margin stays the verdict's.

The variant's verdict needs a majority of the seeds whose baseline collapsed, and reports k/N with the
exact one-sided sign-test p-value. "uninformative" when no baseline collapsed (nothing to prevent).
A prevention is credited to QC only where QC beats BN re-estimation of the same weights (ema+QC − ema+BN,
paired over seeds) by more than its 95 % interval; otherwise EMA with recalibration did the work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel

from qat_assets.core.paired_statistics import PairedDifference, paired_difference, sign_test_p
from qat_assets.core.stability import DEFAULT_COLLAPSE_RATIO

EvidenceKind = Literal["prevented", "uninformative", "collapsed_too", "inconclusive"]
SeedOutcome = Literal["prevented", "collapsed_too", "within_noise"]
MARGIN_Z = 1.96  # two-sided 95 % of a normal: the margin a paired difference must clear in one seed


class Outcome(Protocol):
    """A judged run outcome: a `Stability` or a comparison row."""

    status: str
    best: float | None
    final: float | None
    final_spread: float | None
    failed_rules: list[str]
    collapse_ratio: float | None


@dataclass(frozen=True)
class SeedPair:
    """One seed's baseline and EMA+QC outcomes, and EMA+BN (the same weights, BN re-estimated) when known."""

    seed: int
    baseline: Outcome
    ema_qc: Outcome
    ema_bn: Outcome | None = None


class SeedEvidence(BaseModel):
    """The judgement of one seed whose baseline collapsed."""

    seed: int
    baseline_best: float
    baseline_final: float
    ema_qc_final: float
    line: float  # collapse_ratio × the baseline's best
    margin: float | None  # the paired uncertainty of ema_qc_final − baseline_final; None when unknown
    outcome: SeedOutcome


class EvidenceVerdict(BaseModel):
    variant: str
    kind: EvidenceKind
    text: str
    pairs: int  # seeds with a complete, comparable baseline and EMA+QC run
    baseline_collapsed: int
    prevented: int
    collapsed_too: int = 0
    p_sign_test: float | None = None  # one-sided: P(at least `prevented` of `baseline_collapsed` seeds by chance)
    seeds: list[SeedEvidence] = []
    qc_beyond_bn: PairedDifference | None = None

    @property
    def informative(self) -> bool:
        return self.kind != "uninformative"

    def line(self) -> str:
        return f"{self.variant}: {self.text}"


def paired_margin(first: Outcome, second: Outcome) -> float | None:
    """1.96 × √(s₁² + s₂²) from the two runs' last-m spreads; None when either is unknown."""
    if first.final_spread is None or second.final_spread is None:
        return None
    return MARGIN_Z * math.hypot(first.final_spread, second.final_spread)


def judge_seed(pair: SeedPair) -> SeedEvidence:
    """Prevented, collapsed too, or within noise, for a seed whose baseline collapsed."""
    base, treated = pair.baseline, pair.ema_qc
    line = (base.collapse_ratio or DEFAULT_COLLAPSE_RATIO) * base.best
    margin = paired_margin(base, treated)
    if treated.final < line:
        outcome = "collapsed_too"
    elif margin is not None and treated.final - base.final > margin:
        outcome = "prevented"
    else:
        outcome = "within_noise"
    return SeedEvidence(seed=pair.seed, baseline_best=base.best, baseline_final=base.final,
                        ema_qc_final=treated.final, line=line, margin=margin, outcome=outcome)


def evidence_verdict(variant: str, pairs: Sequence[SeedPair]) -> EvidenceVerdict:
    """The verdict from one variant's seed pairs; pairs with an incomplete run are left out."""
    complete = [p for p in pairs if p.baseline.status != "incomplete" and p.ema_qc.status != "incomplete"]
    judged = [judge_seed(p) for p in complete if "collapsed" in p.baseline.failed_rules]
    n, c = len(complete), len(judged)
    k = sum(s.outcome == "prevented" for s in judged)
    j = sum(s.outcome == "collapsed_too" for s in judged)
    qc_beyond_bn = _qc_beyond_bn(complete)
    p = sign_test_p(k, c) if c else None
    counts = f"prevented in {k}/{c} seeds whose baseline collapsed (one-sided sign test p = {p:.3g})" if c else ""
    if n == 0:
        kind, text = "uninformative", "uninformative: no seed has a complete, comparable baseline and EMA+QC run"
    elif c == 0:
        kind, text = "uninformative", f"uninformative: the baseline did not collapse (0/{n} seeds)"
    elif 2 * k > c:
        kind = "prevented"
        text = f"EMA+QC prevented a collapse the baseline showed: {counts}" + _others(judged, k) + _credit(qc_beyond_bn)
    elif 2 * j > c:
        kind = "collapsed_too"
        text = (f"EMA+QC collapsed too: below the collapse line of the baseline's best in {j}/{c} seeds whose "
                f"baseline collapsed" + (f"; {counts}" if k else ""))
    else:
        kind = "inconclusive"
        text = f"inconclusive, no majority of seeds: {counts}, collapsed too in {j}, within noise in {c - k - j}"
    if c and c < n:
        text += f" (the baseline collapsed in {c} of {n} complete seeds)"
    return EvidenceVerdict(variant=variant, kind=kind, text=text, pairs=n, baseline_collapsed=c, prevented=k,
                           collapsed_too=j, p_sign_test=p, seeds=judged, qc_beyond_bn=qc_beyond_bn)


def _others(judged: Sequence[SeedEvidence], prevented: int) -> str:
    rest = len(judged) - prevented
    if not rest:
        return ""
    too = sum(s.outcome == "collapsed_too" for s in judged)
    return f"; in {rest} more seed(s) EMA+QC collapsed too ({too}) or stayed within noise ({rest - too})"


def _qc_beyond_bn(complete: Sequence[SeedPair]) -> PairedDifference | None:
    """ema+QC − ema+BN over the seeds where both are complete: QC's part beyond BN re-estimation."""
    both = [p for p in complete if p.ema_bn is not None and p.ema_bn.status != "incomplete"]
    if not both:
        return None
    return paired_difference("ema+QC - ema+BN", [p.seed for p in both], [p.ema_qc.final - p.ema_bn.final for p in both])


def _credit(qc_beyond_bn: PairedDifference | None) -> str:
    if qc_beyond_bn is None:
        return "; no +BN runs to hold QC against, so QC's own part is unknown"
    if qc_beyond_bn.positive:
        return (f"; QC is credited: it beats BN re-estimation of the same weights by {qc_beyond_bn.mean:+.4f} "
                f"(95 % CI {qc_beyond_bn.ci_low:+.4f} to {qc_beyond_bn.ci_high:+.4f})")
    interval = ("no interval from one seed" if qc_beyond_bn.ci_low is None
                else f"95 % CI {qc_beyond_bn.ci_low:+.4f} to {qc_beyond_bn.ci_high:+.4f}")
    return (f"; QC is not credited: it does not beat BN re-estimation beyond the paired uncertainty "
            f"({qc_beyond_bn.mean:+.4f}, {interval}), so EMA with recalibration did the work")
