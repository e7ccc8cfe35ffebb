"""What the runs say about the question: paired differences, the noise floor, and one verdict per variant.

The project asks whether EMA + QC prevents the early-peak collapse of W4A16 QAT. That needs a contrast: a
baseline that collapses and an EMA+QC run of the same seed that does not. So every verdict rests on seed
pairs (baseline, ema+QC) that are both complete and comparable:

- "EMA+QC prevented a collapse the baseline showed (k/N seeds)": in k of the N pairs the baseline
  collapsed and EMA+QC did not fail;
- "uninformative: the baseline did not collapse": no pair's baseline collapsed, so there was nothing to
  prevent (a gate that passes on this proves nothing);
- "EMA+QC collapsed too": the baseline collapsed in some pairs, and EMA+QC failed in every one of them.

A difference between methods is called real only when it exceeds the noise floor: the largest spread
(sample std of final mAP50-95) of seeds within one method, or the measured spread of identical runs
(same settings and seed) when it is known and larger.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel

from qat_assets.core.stability import is_collapsed

EvidenceKind = Literal["prevented", "uninformative", "collapsed_too"]


class Outcome(Protocol):
    """A judged run outcome: a `Stability` or a comparison row."""

    status: str
    reason: str


class EvidenceVerdict(BaseModel):
    variant: str
    kind: EvidenceKind
    text: str
    pairs: int  # seeds with a complete, comparable baseline and EMA+QC run
    baseline_collapsed: int
    prevented: int

    @property
    def informative(self) -> bool:
        return self.kind != "uninformative"

    def line(self) -> str:
        return f"{self.variant}: {self.text}"


def evidence_verdict(variant: str, pairs: Sequence[tuple[Outcome, Outcome]]) -> EvidenceVerdict:
    """The verdict from (baseline, ema+QC) outcome pairs of one variant, one pair per seed, both complete."""
    complete = [(b, e) for b, e in pairs if b.status != "incomplete" and e.status != "incomplete"]
    collapsed = [(b, e) for b, e in complete if is_collapsed(b)]
    prevented = sum(e.status == "completed-success" for _, e in collapsed)
    n, c = len(complete), len(collapsed)
    if n == 0:
        kind, text = "uninformative", "uninformative: no seed has a complete, comparable baseline and EMA+QC run"
    elif c == 0:
        kind, text = "uninformative", f"uninformative: the baseline did not collapse (0/{n} seeds)"
    elif prevented:
        kind = "prevented"
        text = f"EMA+QC prevented a collapse the baseline showed ({prevented}/{n} seeds)"
        if prevented < c:
            text += f"; in {c - prevented} more seed(s) the baseline collapsed and EMA+QC failed too"
    else:
        kind, text = "collapsed_too", f"EMA+QC collapsed too (the baseline collapsed in {c}/{n} seeds, EMA+QC in all of them)"
    return EvidenceVerdict(variant=variant, kind=kind, text=text, pairs=n, baseline_collapsed=c, prevented=prevented)


class NoiseFloor(BaseModel):
    """How large a difference in final mAP50-95 must be before it is more than run-to-run noise."""

    seed_spread: float | None  # largest std over seeds within one method
    seed_spread_method: str | None
    identical_run_spread: float | None  # measured spread of identical runs (same settings and seed), if known
    identical_run_source: str | None

    @property
    def value(self) -> float | None:
        known = [v for v in (self.seed_spread, self.identical_run_spread) if v is not None]
        return max(known) if known else None

    def is_real(self, difference: float | None) -> bool | None:
        """True/False when both are known; None when the difference or the floor is unknown."""
        if difference is None or self.value is None:
            return None
        return abs(difference) > self.value

    def describe(self) -> str:
        seed = (f"seed spread {self.seed_spread:.4f} (std of final over seeds, {self.seed_spread_method})"
                if self.seed_spread is not None else "seed spread unknown (fewer than two seeds per method)")
        identical = (f"identical-run spread {self.identical_run_spread:.4f} ({self.identical_run_source})"
                     if self.identical_run_spread is not None else "identical-run spread not measured")
        value = "unknown: no difference is called real" if self.value is None else f"{self.value:.4f}"
        return f"noise floor {value}: {seed}; {identical}"


def noise_floor(
    finals_by_method: dict[str, Sequence[float]], identical_run_spread: float | None = None,
    identical_run_source: str | None = None,
) -> NoiseFloor:
    spreads = {m: statistics.stdev(v) for m, v in finals_by_method.items() if len(v) > 1}
    method = max(spreads, key=spreads.get, default=None)
    return NoiseFloor(
        seed_spread=spreads[method] if method is not None else None, seed_spread_method=method,
        identical_run_spread=identical_run_spread,
        identical_run_source=identical_run_source if identical_run_spread is not None else None,
    )
