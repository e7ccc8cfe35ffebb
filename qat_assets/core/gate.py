"""The gate before yolo10m: enough stable, comparable EMA+QC seeds on every validation variant.

The gate passes only when, for each gated variant, at least `min_seeds` of the configured seeds have a
run of the gated method (by default EMA, judged after QC) that is complete, comparable and neither
degenerate, collapsed nor fallen below PTQ (status `completed-success`, by the windowed rule of
`stability.py`). The decision is data: it never raises for missing or bad runs, and its reasons name every
problem found, so whoever reads a failing gate knows what to re-run.

That rule never reads the baseline, so the decision also carries the evidence verdict per variant
(`evidence.py`): whether the baseline collapsed at all, and whether EMA+QC stayed above its line. With
`require_informative`, a gate whose evidence is uninformative does not pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from qat_assets.core.comparison import find_non_comparable, outcome_label, outcome_stability, run_id
from qat_assets.core.evidence import EvidenceVerdict, SeedPair, evidence_verdict
from qat_assets.core.settings import VALIDATION_VARIANTS
from qat_assets.core.summary import RunSummary


EVIDENCE_CHECK = "evidence_informative"


class CheckOutcome(BaseModel):
    passed: bool
    description: str


class VariantGate(BaseModel):
    passed: bool
    good_seeds: list[int]
    problems: list[str]


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    per_variant: dict[str, VariantGate]
    method: str  # the judged outcome's label, e.g. "ema+QC"
    min_seeds: int
    seeds: list[int]
    evidence: dict[str, EvidenceVerdict] = {}
    require_informative: bool = False

    @property
    def informative(self) -> bool:
        """Every gated variant's evidence can say something (its baseline collapsed in some seed)."""
        return bool(self.evidence) and all(v.informative for v in self.evidence.values())

    def evidence_lines(self) -> list[str]:
        return [verdict.line() for verdict in self.evidence.values()]

    def headline(self) -> str:
        """One line for logs, metadata and the top of the report."""
        counts = ", ".join(f"{v} {len(g.good_seeds)}/{self.min_seeds}" for v, g in self.per_variant.items())
        verdict = "PASSED" if self.passed else "NOT PASSED"
        return f"gate {verdict}: stable comparable {self.method} seeds {counts}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> GateDecision:
        return cls.model_validate(payload)


def decide_gate(
    summaries: Sequence[RunSummary],
    *,
    seeds: Sequence[int],
    variants: Sequence[str] = VALIDATION_VARIANTS,
    min_seeds: int = 2,
    method: str = "ema",
    with_qc: bool = True,
    fp_dataset_fingerprints: Mapping[str, str] | None = None,
    require_informative: bool = False,
) -> GateDecision:
    """Decide the gate from the run summaries at hand (any subset, including none).

    Comparability is judged over the summaries of the gated variants only (see `comparison`), so stray
    runs of other variants cannot shift the reference. When a partition has several summaries, the most
    recently created one counts.
    """
    outcome = "qc" if with_qc else "qat"
    label = outcome_label(method, outcome)
    gated = [s for s in sorted(summaries, key=lambda s: s.created_at) if s.variant in variants]
    latest = {run_id(s): s for s in gated}
    non_comparable = find_non_comparable(list(latest.values()), fp_dataset_fingerprints=fp_dataset_fingerprints)

    per_variant: dict[str, VariantGate] = {}
    evidence: dict[str, EvidenceVerdict] = {}
    reasons: list[str] = []
    if min_seeds > len(seeds):
        reasons.append(f"only {len(seeds)} seeds are configured ({list(seeds)}) but the gate needs {min_seeds}")
    for variant in variants:
        good: list[int] = []
        problems: list[str] = []
        for seed in seeds:
            key = f"{method}|{seed}"
            where = f"{variant}/stability_verdict {key}"
            summary = latest.get((variant, key))
            if summary is None:
                problems.append(f"{where} is missing")
                continue
            stability = outcome_stability(summary, outcome)
            if stability.status == "incomplete":
                problems.append(f"{where} ({label}) is incomplete: {stability.reason}")
            elif stability.status == "completed-failed":
                problems.append(f"{where} ({label}) failed: {stability.reason}")
            if (variant, key) in non_comparable:
                problems.append(f"{where} is not comparable: {non_comparable[(variant, key)]}")
            elif stability.status == "completed-success":
                good.append(seed)
        evidence[variant] = evidence_verdict(variant, [
            SeedPair(seed=seed, baseline=outcome_stability(latest[variant, f"baseline|{seed}"], "qat"),
                     ema_qc=outcome_stability(latest[variant, f"ema|{seed}"], "qc"),
                     ema_bn=outcome_stability(latest[variant, f"ema|{seed}"], "bn"))
            for seed in seeds
            if all((variant, f"{m}|{seed}") in latest and (variant, f"{m}|{seed}") not in non_comparable
                   for m in ("baseline", "ema"))
        ])
        passed = len(good) >= min_seeds
        per_variant[variant] = VariantGate(passed=passed, good_seeds=good, problems=problems)
        seeds_text = ", ".join(map(str, good)) or "none"
        reasons.append(
            f"{variant}: {len(good)} of {min_seeds} required {label} seeds are complete, comparable and stable "
            f"(neither collapsed, below PTQ nor degenerate; seeds: {seeds_text})"
        )
        reasons.extend(problems)
    passed = bool(variants) and all(g.passed for g in per_variant.values())
    uninformative = [v.line() for v in evidence.values() if not v.informative]
    if require_informative and uninformative:
        passed = False
        reasons.append("informative evidence is required (gate_require_informative) and is missing: "
                       + "; ".join(uninformative))
    return GateDecision(
        passed=passed,
        evidence=evidence,
        require_informative=require_informative,
        reasons=reasons,
        per_variant=per_variant,
        method=label,
        min_seeds=min_seeds,
        seeds=list(seeds),
    )


def evidence_check_outcome(decision: GateDecision) -> CheckOutcome:
    """The `evidence_informative` check: fails (a warning, not a block) when some variant's evidence is uninformative."""
    lines = decision.evidence_lines() or ["no variant has runs to judge"]
    if decision.informative:
        return CheckOutcome(passed=True, description="evidence is informative: " + "; ".join(lines))
    verdict = "PASSED" if decision.passed else "did not pass"
    return CheckOutcome(
        passed=False,
        description=f"the gate {verdict} on evidence that cannot say no: " + "; ".join(lines),
    )
