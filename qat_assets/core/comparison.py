"""Comparability of runs and the baseline / +QC / +BN / EMA comparison table, with paired rows and verdicts.

Two runs compare only when they saw the same data (dataset fingerprint), were evaluated the same way
(evaluation settings) and trained under the same profile (training-profile fingerprint). Rather than
comparing every pair, each run is checked against one reference for the whole run group (all variants
of one gate: settings are not per variant, so yolo10n and yolo10s must agree too):

- each of the three parts of the reference is the value most runs in the group share; a tie goes to the
  value of the most recently created run, because the newest runs reflect the current settings;
- when a floating-point reference is given for a variant, a run of that variant whose dataset fingerprint
  differs from the FP reference's is not comparable either (its mAP would be measured on other data).

Non-comparable runs stay in the tables, flagged with the reason, and are left out of the averages and
the gate.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from qat_assets.core.evidence import EvidenceVerdict, NoiseFloor, evidence_verdict, noise_floor
from qat_assets.core.settings import VARIANTS
from qat_assets.core.summary import RunSummary, Stability

RunId = tuple[str, str]  # (variant, partition key), e.g. ("yolo10n", "ema|0")
# What each run contributes to the table: the QAT run alone, after QC, after BN re-estimation.
OUTCOMES = ("qat", "qc", "bn")


def run_id(summary: RunSummary) -> RunId:
    return (summary.variant, summary.partition_key)


def outcome_label(method: str, outcome: str) -> str:
    """`ema` for the QAT run alone, `ema+QC` after quantization correction, `ema+BN` after BN re-estimation."""
    return {"qat": method, "qc": f"{method}+QC", "bn": f"{method}+BN"}[outcome]


def outcome_stability(summary: RunSummary, outcome: str) -> Stability | None:
    """None only for +BN of a summary written before BN re-estimation existed."""
    return {"qat": summary.stability_qat, "qc": summary.stability_qat_qc, "bn": summary.stability_qat_bn}[outcome]


def comparability_key(summary: RunSummary) -> tuple[str, str, str]:
    """(dataset fingerprint, evaluation settings as canonical JSON, training-profile fingerprint)."""
    return (
        str(summary.dataset["fingerprint"]),
        json.dumps(summary.evaluation, sort_keys=True, default=str),
        str(summary.training["profile_fingerprint"]),
    )


class ComparabilityReference(BaseModel):
    """What every run of a group is compared against; `basis` says how it was chosen."""

    dataset_fingerprint: str
    evaluation: dict[str, Any]
    profile_fingerprint: str
    basis: str


def comparability_reference(summaries: Sequence[RunSummary]) -> ComparabilityReference | None:
    """Per part, the value most runs share (ties: the most recently created run's value); None if no runs."""
    if not summaries:
        return None
    newest_first = sorted(summaries, key=lambda s: s.created_at, reverse=True)
    keys = [comparability_key(s) for s in newest_first]

    def majority(part: int) -> str:
        counts = Counter(k[part] for k in keys)
        top = max(counts.values())
        return next(k[part] for k in keys if counts[k[part]] == top)  # newest among the tied values

    return ComparabilityReference(
        dataset_fingerprint=majority(0),
        evaluation=json.loads(majority(1)),
        profile_fingerprint=majority(2),
        basis=f"majority of {len(summaries)} runs, ties going to the newest run",
    )


def find_non_comparable(
    summaries: Sequence[RunSummary],
    *,
    reference: ComparabilityReference | None = None,
    fp_dataset_fingerprints: Mapping[str, str] | None = None,
) -> dict[RunId, str]:
    """Runs that cannot be compared with the group, each with the reason naming every part that differs."""
    reference = reference or comparability_reference(summaries)
    if reference is None:
        return {}
    fp_dataset_fingerprints = fp_dataset_fingerprints or {}
    problems: dict[RunId, str] = {}
    for summary in summaries:
        dataset_fp, evaluation, profile_fp = comparability_key(summary)
        differences = []
        if dataset_fp != reference.dataset_fingerprint:
            differences.append(f"dataset fingerprint {dataset_fp} != {reference.dataset_fingerprint}")
        fp_dataset = fp_dataset_fingerprints.get(summary.variant)
        if fp_dataset is not None and dataset_fp != fp_dataset:
            differences.append(f"dataset fingerprint {dataset_fp} != FP reference's {fp_dataset}")
        if evaluation != json.dumps(reference.evaluation, sort_keys=True, default=str):
            differences.append(f"evaluation settings {_changed(summary.evaluation, reference.evaluation)}")
        if profile_fp != reference.profile_fingerprint:
            differences.append(f"training profile {profile_fp} != {reference.profile_fingerprint}")
        if differences:
            problems[run_id(summary)] = "; ".join(differences) + f" (reference: {reference.basis})"
    return problems


def _changed(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    keys = sorted(set(actual) | set(expected))
    return ", ".join(f"{k}={actual.get(k)!r} != {expected.get(k)!r}" for k in keys if actual.get(k) != expected.get(k))


class ComparisonRow(BaseModel):
    variant: str
    method: str  # baseline, baseline+QC, baseline+BN, ema, ema+QC, ema+BN
    seed: int
    partition_key: str
    status: str
    reason: str
    ptq_map50_95: float | None
    best: float | None
    best_epoch: int | None
    final: float | None
    final_epoch: int | None
    final_over_best: float | None
    qc_delta: float | None  # only on +QC rows
    onnx_map50_95: float | None = None  # the exported W4 model in onnxruntime ({v}/onnx_model), on the row it was exported from
    bn_delta: float | None = None  # only on +BN rows
    comparable: bool
    not_comparable_reason: str | None


class MethodAggregate(BaseModel):
    """Mean and sample std of one method over the comparable, complete seeds of one variant.

    Collapsed and degenerate runs are included (they are real outcomes); incomplete runs are not (their
    "final" is wherever they stopped). std is None with fewer than two seeds.
    """

    method: str
    seeds: list[int]
    failed: int
    mean_final: float | None
    std_final: float | None
    mean_best: float | None
    mean_final_over_best: float | None
    mean_paired_difference: float | None = None  # mean over seeds of (this method's final - baseline final)
    real: bool | None = None  # |mean paired difference| above the noise floor (None: floor unknown)


class PairedRow(BaseModel):
    """One method's run against the baseline run of the same seed (both complete and comparable)."""

    seed: int
    method: str
    final: float | None
    final_over_best: float | None
    baseline_final: float | None
    baseline_final_over_best: float | None
    difference: float | None  # final - baseline final
    real: bool | None  # |difference| above the noise floor (None: floor unknown)


class VariantComparison(BaseModel):
    variant: str
    fp_map50_95: float | None
    fp_map50: float | None
    rows: list[ComparisonRow]
    aggregates: list[MethodAggregate]
    paired: list[PairedRow] = []
    noise_floor: NoiseFloor | None = None
    evidence: EvidenceVerdict | None = None


class Comparison(BaseModel):
    reference: ComparabilityReference | None
    variants: list[VariantComparison]

    def rows(self) -> list[dict[str, Any]]:
        """Every run row plus one FP-reference row per variant, as plain dicts (e.g. for a Dagster table)."""
        out: list[dict[str, Any]] = []
        for variant in self.variants:
            if variant.fp_map50_95 is not None:
                out.append(_fp_row(variant))
            out.extend(row.model_dump() for row in variant.rows)
        return out

    def to_dataframe(self):
        import pandas as pd  # lazy: keeps the Dagster code location quick to load

        return pd.DataFrame(self.rows(), columns=list(ComparisonRow.model_fields))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Comparison:
        return cls.model_validate(payload)

    def evidence_lines(self) -> list[str]:
        """One evidence verdict per variant, e.g. "yolo10n: uninformative: the baseline did not collapse (0/2 seeds)"."""
        return [v.evidence.line() for v in self.variants if v.evidence is not None]

    def to_markdown(self) -> str:
        parts = []
        if self.reference is not None:
            ref = self.reference
            parts.append(
                f"Comparability reference ({ref.basis}): dataset `{ref.dataset_fingerprint}`, "
                f"training profile `{ref.profile_fingerprint}`, evaluation "
                f"`{json.dumps(ref.evaluation, sort_keys=True, default=str)}`."
            )
        if not self.variants:
            parts.append("No runs to compare yet.")
        for variant in self.variants:
            parts.append(f"### {variant.variant}")
            fp = "not available" if variant.fp_map50_95 is None else (
                f"mAP50-95 {_num(variant.fp_map50_95)}, mAP50 {_num(variant.fp_map50)}"
            )
            parts.append(f"FP reference: {fp}.")
            if variant.evidence is not None:
                parts.append(f"**Evidence: {variant.evidence.text}.**")
            if variant.noise_floor is not None:
                parts.append(f"{variant.noise_floor.describe()[0].upper()}{variant.noise_floor.describe()[1:]}.")
            parts.append("Paired with the baseline run of the same seed (difference = final - baseline final; "
                         "real = larger than the noise floor):")
            parts.append(_markdown_table(
                ["seed", "method", "final", "final/best", "baseline final", "baseline final/best", "difference",
                 "real"],
                [[str(p.seed), p.method, _num(p.final), _num(p.final_over_best, 2), _num(p.baseline_final),
                  _num(p.baseline_final_over_best, 2), _num(p.difference, 4, signed=True), _yes_no(p.real)]
                 for p in variant.paired],
            ))
            parts.append("Per method, over comparable and complete seeds (collapsed runs included):")
            parts.append(_markdown_table(
                ["method", "seeds", "failed", "final mean ± std", "best mean", "final/best mean",
                 "paired difference mean", "real"],
                [[a.method, ", ".join(map(str, a.seeds)) or "none", str(a.failed),
                  f"{_num(a.mean_final)} ± {_num(a.std_final)}", _num(a.mean_best),
                  _num(a.mean_final_over_best, 2), _num(a.mean_paired_difference, 4, signed=True), _yes_no(a.real)]
                 for a in variant.aggregates],
            ))
            parts.append("Every run:")
            parts.append(_markdown_table(
                ["method", "seed", "status", "PTQ", "best (epoch)", "final (epoch)", "final/best", "QC delta",
                 "BN delta", "ONNX mAP", "comparable", "reason"],
                [[r.method, str(r.seed), r.status, _num(r.ptq_map50_95), _at(r.best, r.best_epoch),
                  _at(r.final, r.final_epoch), _num(r.final_over_best, 2), _num(r.qc_delta, 4, signed=True),
                  _num(r.bn_delta, 4, signed=True), _num(r.onnx_map50_95),
                  "yes" if r.comparable else f"no: {r.not_comparable_reason}",
                  r.reason] for r in variant.rows],
            ))
        return "\n\n".join(parts) + "\n"


def build_comparison(
    summaries: Sequence[RunSummary],
    fp_reference: Mapping[str, Mapping[str, Any]] | None = None,
    onnx_results: Sequence[Mapping[str, Any]] = (),
    *,
    identical_run_spread: float | None = None,
    identical_run_source: str | None = None,
) -> Comparison:
    """Tables per variant: every outcome per seed, rows paired with the baseline, per-method aggregates, noise
    floor, evidence verdict and FP.

    `fp_reference[variant]` holds `map50_95`, `map50` and `dataset_fingerprint` of the floating-point model.
    `onnx_results` are `{v}/onnx_model` results; each fills the ONNX mAP of the row its source checkpoint
    belongs to (the +QC row for `source=qc`).
    `identical_run_spread` is the measured mAP50-95 spread of identical runs, when known; it raises the
    noise floor above the seed spread.
    """
    fp_reference = fp_reference or {}
    onnx_map = {
        (r["variant"], outcome_label(r["method"], "qc" if r["source"] == "qc" else "qat"), r["seed"]): r["onnx_metrics"]["map50_95"]
        for r in onnx_results if "onnx_metrics" in r
    }
    fp_fingerprints = {v: str(r["dataset_fingerprint"]) for v, r in fp_reference.items() if r.get("dataset_fingerprint")}
    reference = comparability_reference(summaries)
    non_comparable = find_non_comparable(summaries, reference=reference, fp_dataset_fingerprints=fp_fingerprints)
    variants = []
    for variant in _variant_order({s.variant for s in summaries} | set(fp_reference)):
        runs = sorted((s for s in summaries if s.variant == variant), key=lambda s: (s.method, s.seed))
        rows = [
            _row(s, outcome, non_comparable.get(run_id(s)))
            for s in runs for outcome in OUTCOMES if outcome_stability(s, outcome) is not None
        ]
        rows = sorted(rows, key=lambda r: (_label_order(r.method), r.seed))
        for row in rows:
            row.onnx_map50_95 = onnx_map.get((row.variant, row.method, row.seed))
        labels = sorted({r.method for r in rows}, key=_label_order)
        counted = [r for r in rows if r.comparable and r.status != "incomplete"]
        floor = noise_floor(
            {label: [r.final for r in counted if r.method == label and r.final is not None] for label in labels},
            identical_run_spread, identical_run_source,
        )
        paired = _paired_rows(counted, floor)
        fp = fp_reference.get(variant, {})
        variants.append(VariantComparison(
            variant=variant,
            fp_map50_95=fp.get("map50_95"),
            fp_map50=fp.get("map50"),
            rows=rows,
            aggregates=[_aggregate(label, [r for r in rows if r.method == label], paired, floor) for label in labels],
            paired=paired,
            noise_floor=floor,
            evidence=evidence_verdict(variant, _seed_pairs(counted, "baseline", "ema+QC")),
        ))
    return Comparison(reference=reference, variants=variants)


def deployment_markdown(onnx_results: Sequence[Mapping[str, Any]]) -> str:
    """summary.md section: each exported W4 model's file size against the FP model, and its onnxruntime figures."""
    done = [r for r in onnx_results if "onnx_metrics" in r]
    if not done:
        return "## Deployable W4 model (ONNX)\n\nNo `{v}/onnx_model` materialized yet.\n"
    table = _markdown_table(
        ["variant", "run", "source", "W4 QCDQ file", "INT4 file (floor)", "FP file", "W4/FP", "ONNX mAP50-95",
         "PyTorch mAP50-95", "NMS-free head mAP50-95 ONNX / PyTorch", "head max rel diff", "goals"],
        [[r["variant"], f"{r['method']}|{r['seed']}", r["source"], f"{r['w4_bytes'] / 1e6:.2f} MB",
          f"{r['int4']['bytes'] / 1e6:.2f} MB ({r['int4'].get('floor_bytes', 0) / 1e6:.2f} MB)" if r.get("int4") else "-",
          f"{r['fp_bytes'] / 1e6:.2f} MB", f"{r['w4_bytes'] / r['fp_bytes']:.2f}", _num(r["onnx_metrics"]["map50_95"]),
          _num(r["torch_metrics"]["map50_95"]), f"{_num(r['end2end']['onnx_metrics']['map50_95'])} / "
          f"{_num(r['end2end']['torch_metrics']['map50_95'])}" if r.get("end2end") else "-", f"{r['parity']['max_rel']:.1e}",
          "met" if not r["failures"] else "missed: " + "; ".join(r["failures"])] for r in done],
    )
    return (
        "## Deployable W4 model (ONNX)\n\nBrevitas QCDQ export (int8-stored weights clipped to the 4-bit range, "
        "per-channel DequantizeLinear), run in onnxruntime through Ultralytics' validator with the same settings "
        f"as every figure above.\n\n{table}\n"
    )


def _seed_pairs(rows: Sequence[ComparisonRow], first: str, second: str) -> list[tuple[ComparisonRow, ComparisonRow]]:
    by_key = {(r.method, r.seed): r for r in rows}
    seeds = sorted({r.seed for r in rows})
    return [(by_key[first, s], by_key[second, s]) for s in seeds if (first, s) in by_key and (second, s) in by_key]


def _paired_rows(counted: Sequence[ComparisonRow], floor: NoiseFloor) -> list[PairedRow]:
    """Each non-baseline row against the baseline run of its seed; both complete and comparable."""
    baselines = {r.seed: r for r in counted if r.method == "baseline"}
    paired = []
    for row in counted:
        base = baselines.get(row.seed)
        if row.method == "baseline" or base is None:
            continue
        difference = row.final - base.final if row.final is not None and base.final is not None else None
        paired.append(PairedRow(
            seed=row.seed, method=row.method, final=row.final, final_over_best=row.final_over_best,
            baseline_final=base.final, baseline_final_over_best=base.final_over_best, difference=difference,
            real=floor.is_real(difference),
        ))
    return sorted(paired, key=lambda p: (p.seed, _label_order(p.method)))


def _row(summary: RunSummary, outcome: str, not_comparable_reason: str | None) -> ComparisonRow:
    stability = outcome_stability(summary, outcome)
    return ComparisonRow(
        variant=summary.variant,
        method=outcome_label(summary.method, outcome),
        seed=summary.seed,
        partition_key=summary.partition_key,
        status=stability.status,
        reason=stability.reason,
        ptq_map50_95=summary.ptq_map50_95,
        best=stability.best,
        best_epoch=stability.best_epoch,
        final=stability.final,
        final_epoch=stability.final_epoch,
        final_over_best=stability.final_over_best,
        qc_delta=summary.qc.delta if outcome == "qc" and summary.qc is not None else None,
        bn_delta=summary.bn.delta if outcome == "bn" and summary.bn is not None else None,
        comparable=not_comparable_reason is None,
        not_comparable_reason=not_comparable_reason,
    )


def _aggregate(
    label: str, rows: Iterable[ComparisonRow], paired: Sequence[PairedRow], floor: NoiseFloor
) -> MethodAggregate:
    counted = [r for r in rows if r.comparable and r.status != "incomplete"]
    differences = [p.difference for p in paired if p.method == label and p.difference is not None]
    mean_difference = statistics.fmean(differences) if differences else None
    finals = [r.final for r in counted if r.final is not None]
    bests = [r.best for r in counted if r.best is not None]
    ratios = [r.final_over_best for r in counted if r.final_over_best is not None]
    return MethodAggregate(
        method=label,
        seeds=sorted(r.seed for r in counted),
        failed=sum(r.status == "completed-failed" for r in counted),
        mean_final=statistics.fmean(finals) if finals else None,
        std_final=statistics.stdev(finals) if len(finals) > 1 else None,
        mean_best=statistics.fmean(bests) if bests else None,
        mean_final_over_best=statistics.fmean(ratios) if ratios else None,
        mean_paired_difference=mean_difference,
        real=floor.is_real(mean_difference),
    )


def _fp_row(variant: VariantComparison) -> dict[str, Any]:
    row = {name: None for name in ComparisonRow.model_fields}
    row.update(variant=variant.variant, method="FP", status="reference", reason="floating-point model",
               final=variant.fp_map50_95, best=variant.fp_map50_95, comparable=True)
    return row


def _variant_order(variants: set[str]) -> list[str]:
    return sorted(variants, key=lambda v: (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS), v))


def _label_order(label: str) -> tuple[int, str]:
    known = ["baseline", "baseline+QC", "baseline+BN", "ema", "ema+QC", "ema+BN"]
    return (known.index(label) if label in known else len(known), label)


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _at(value: float | None, epoch: int | None) -> str:
    return _num(value) if epoch is None else f"{_num(value)} ({epoch})"


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])
