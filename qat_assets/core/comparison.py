"""Comparability of runs and the baseline / +QC / +BN / EMA comparison table, with paired rows and verdicts.

Two runs compare only when they saw the same data (dataset fingerprint), were evaluated the same way
(evaluation settings), trained under the same profile (training-profile fingerprint) and at the same batch:
Ultralytics halves the configured batch when a run's first epoch runs out of GPU memory
(trainer.training_batch), and such a run is not comparable with runs at the configured batch. Rather than
comparing every pair, each run is checked against one reference for the whole run group (all variants
of one gate: settings are not per variant, so yolo10n and yolo10s must agree too):

- each of the three parts of the reference is the value most runs in the group share; a tie goes to the
  value of the most recently created run, because the newest runs reflect the current settings;
- when a floating-point reference is given for a variant, a run of that variant whose dataset fingerprint
  differs from the FP reference's is not comparable either (its mAP would be measured on other data).

Non-comparable runs stay in the tables, flagged with the reason, and are left out of the averages and
the gate.

Beside the across-seed statistics, each seed's EMA − baseline carries its within-seed uncertainty: the paired
bootstrap over val images of the seed's final EMA copy and live weights (core/within_seed.py), recorded in both
run summaries of the seed. It is val-image sampling only, not training noise; the verdict does not use it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from qat_assets.core.attribution import GridCell, against_baseline, contributions, grid, label_order
from qat_assets.core.evidence import EvidenceVerdict, SeedPair, evidence_verdict, paired_margin
from qat_assets.core.paired_statistics import PairedDifference, seeds_needed
from qat_assets.core.settings import VARIANTS
from qat_assets.core.summary import RunSummary, Stability, WithinSeed

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


def comparability_key(summary: RunSummary) -> tuple[str, str, str, str, str]:
    """(dataset fingerprint, evaluation settings as canonical JSON, training-profile fingerprint, the batches it
    trained at as JSON, the training precision). A summary from before the batch used was recorded counts as
    its configured batch; one from before the precision was recorded (or before AMP existed) as fp32 ("off")."""
    batch_used = summary.training.get("batch_used") or [summary.training.get("batch")]
    return (
        str(summary.dataset["fingerprint"]),
        json.dumps(summary.evaluation, sort_keys=True, default=str),
        str(summary.training["profile_fingerprint"]),
        json.dumps(batch_used),
        str(summary.training.get("precision") or "off"),
    )


class ComparabilityReference(BaseModel):
    """What every run of a group is compared against; `basis` says how it was chosen."""

    dataset_fingerprint: str
    evaluation: dict[str, Any]
    profile_fingerprint: str
    basis: str
    training_batch: list[int | None] = []  # empty in comparisons written before the batch used was compared
    training_precision: str = "off"  # what `amp` resolved to; comparisons written before it was compared: fp32


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
        training_batch=json.loads(majority(3)),
        training_precision=majority(4),
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
        dataset_fp, evaluation, profile_fp, batch_used, precision = comparability_key(summary)
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
        if json.loads(batch_used) != reference.training_batch:
            configured = summary.training.get("batch")
            halved = " (Ultralytics halved it after running out of memory)" if json.loads(batch_used) != [configured] else ""
            differences.append(f"trained at batch {json.loads(batch_used)}{halved} != {reference.training_batch}")
        if precision != reference.training_precision:
            differences.append(f"trained in precision {precision} != {reference.training_precision}")
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
    best_from_epoch: int | None = None  # best and final are window medians: first epoch of each window
    final_from_epoch: int | None = None
    final_spread: float | None = None  # robust spread of the run's last m validations (its own noise)
    failed_rules: list[str] = []
    collapse_ratio: float | None = None
    qc_delta: float | None  # only on +QC rows
    onnx_map50_95: float | None = None  # the exported W4 model in onnxruntime ({v}/onnx_model), on the row it was exported from
    bn_delta: float | None = None  # only on +BN rows
    comparable: bool
    not_comparable_reason: str | None


class PairedRow(BaseModel):
    """One method's run against the baseline run of the same seed (both complete and comparable)."""

    seed: int
    method: str
    final: float | None
    final_over_best: float | None
    baseline_final: float | None
    baseline_final_over_best: float | None
    difference: float | None  # final - baseline final
    margin: float | None = None  # the paired uncertainty of this seed's difference (see evidence.paired_margin)

    @property
    def beyond_margin(self) -> bool | None:
        if self.difference is None or self.margin is None:
            return None
        return abs(self.difference) > self.margin


class WithinSeedRow(BaseModel):
    """One seed's EMA − baseline (the paired table's window-median finals) and its within-seed uncertainty, the
    paired bootstrap over val images of the final EMA and live weights (a single validation each)."""

    seed: int
    difference: float | None  # ema final − baseline final, as in `PairedRow`
    within_seed: WithinSeed


class VariantComparison(BaseModel):
    variant: str
    fp_map50_95: float | None
    fp_map50: float | None
    rows: list[ComparisonRow]
    paired: list[PairedRow] = []
    against_baseline: list[PairedDifference] = []  # per outcome: final - baseline final, over seeds
    contributions: list[PairedDifference] = []  # EMA alone, BN alone, QC alone, QC beyond BN
    grid: list[list[GridCell]] = []  # {baseline, EMA} x {nothing, +BN, +QC}
    within_seed: list[WithinSeedRow] = []  # seeds with a paired ema row whose summaries record the bootstrap
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
                f"training profile `{ref.profile_fingerprint}`, trained at batch {ref.training_batch}, evaluation "
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
                if variant.evidence.seeds:
                    parts.append(_seed_evidence_table(variant.evidence))
            parts.append("Final mAP50-95 over comparable, complete seeds, mean ± std (seeds, failed); "
                         "{baseline, EMA} × {nothing, +BN, +QC}:")
            parts.append(_markdown_table(
                ["", "nothing", "+BN", "+QC"],
                [[line[0].method, *(_cell(c) for c in line)] for line in variant.grid],
            ))
            parts.append("Each component's own part, paired within seeds (95 % t-interval; real = the interval "
                         "excludes 0; p: exact two-sided sign flip):")
            parts.append(_paired_table(variant.contributions))
            parts.append("Against the baseline run of the same seed (final - baseline final):")
            parts.append(_paired_table(variant.against_baseline))
            parts.append(_within_seed_section(variant))
            parts.append(_seeds_note(variant))
            parts.append("Per seed (margin: 1.96 × √(s_b² + s²) from the two runs' last-window spreads):")
            parts.append(_markdown_table(
                ["seed", "method", "final", "final/best", "baseline final", "baseline final/best", "difference",
                 "margin", "beyond margin"],
                [[str(p.seed), p.method, _num(p.final), _num(p.final_over_best, 2), _num(p.baseline_final),
                  _num(p.baseline_final_over_best, 2), _num(p.difference, 4, signed=True), _num(p.margin),
                  _yes_no(p.beyond_margin)]
                 for p in variant.paired],
            ))
            parts.append("Every run:")
            parts.append(_markdown_table(
                ["method", "seed", "status", "PTQ", "best (epoch)", "final (epoch)", "final/best", "QC delta",
                 "BN delta", "ONNX mAP", "comparable", "reason"],
                [[r.method, str(r.seed), r.status, _num(r.ptq_map50_95), _at(r.best, r.best_from_epoch, r.best_epoch),
                  _at(r.final, r.final_from_epoch, r.final_epoch), _num(r.final_over_best, 2), _num(r.qc_delta, 4, signed=True),
                  _num(r.bn_delta, 4, signed=True), _num(r.onnx_map50_95),
                  "yes" if r.comparable else f"no: {r.not_comparable_reason}",
                  r.reason] for r in variant.rows],
            ))
        return "\n\n".join(parts) + "\n"


def build_comparison(
    summaries: Sequence[RunSummary],
    fp_reference: Mapping[str, Mapping[str, Any]] | None = None,
    onnx_results: Sequence[Mapping[str, Any]] = (),
) -> Comparison:
    """Tables per variant: every outcome per seed, the {baseline, EMA} × {nothing, +BN, +QC} grid, paired
    statistics against the baseline and per component, the evidence verdict and FP.

    `fp_reference[variant]` holds `map50_95`, `map50` and `dataset_fingerprint` of the floating-point model.
    `onnx_results` are `{v}/onnx_model` results; each fills the ONNX mAP of the row its source checkpoint
    belongs to (the +QC row for `source=qc`).
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
        rows = sorted(rows, key=lambda r: (label_order(r.method), r.seed))
        for row in rows:
            row.onnx_map50_95 = onnx_map.get((row.variant, row.method, row.seed))
        counted = [r for r in rows if r.comparable and r.status != "incomplete"]
        fp = fp_reference.get(variant, {})
        paired = _paired_rows(counted)
        variants.append(VariantComparison(
            variant=variant,
            fp_map50_95=fp.get("map50_95"),
            fp_map50=fp.get("map50"),
            rows=rows,
            paired=paired,
            within_seed=_within_seed_rows(runs, paired),
            against_baseline=against_baseline(counted),
            contributions=contributions(counted),
            grid=grid(counted),
            evidence=evidence_verdict(variant, _seed_pairs(rows)),
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


def _seed_pairs(rows: Sequence[ComparisonRow]) -> list[SeedPair]:
    """(baseline, ema+QC, ema+BN) per seed, from comparable rows; `evidence_verdict` leaves out incomplete ones."""
    by_key = {(r.method, r.seed): r for r in rows if r.comparable}
    seeds = sorted({r.seed for r in rows})
    return [SeedPair(seed=s, baseline=by_key["baseline", s], ema_qc=by_key["ema+QC", s], ema_bn=by_key.get(("ema+BN", s)))
            for s in seeds if ("baseline", s) in by_key and ("ema+QC", s) in by_key]


def _paired_rows(counted: Sequence[ComparisonRow]) -> list[PairedRow]:
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
            margin=paired_margin(row, base),
        ))
    return sorted(paired, key=lambda p: (p.seed, label_order(p.method)))


def _within_seed_rows(runs: Sequence[RunSummary], paired: Sequence[PairedRow]) -> list[WithinSeedRow]:
    """Per seed with a paired `ema` row (both runs complete and comparable): the bootstrap its ema summary records.
    Both summaries of a seed record the same one: it belongs to their shared trajectory."""
    recorded = {s.seed: s.within_seed for s in runs if s.method == "ema" and s.within_seed is not None}
    return [WithinSeedRow(seed=p.seed, difference=p.difference, within_seed=recorded[p.seed])
            for p in paired if p.method == "ema" and p.seed in recorded]


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
        best_from_epoch=stability.best_from_epoch,
        final_from_epoch=stability.final_from_epoch,
        final_spread=stability.final_spread,
        failed_rules=stability.failed_rules,
        collapse_ratio=stability.collapse_ratio,
        qc_delta=summary.qc.delta if outcome == "qc" and summary.qc is not None else None,
        bn_delta=summary.bn.delta if outcome == "bn" and summary.bn is not None else None,
        comparable=not_comparable_reason is None,
        not_comparable_reason=not_comparable_reason,
    )


def _fp_row(variant: VariantComparison) -> dict[str, Any]:
    row = {name: None for name in ComparisonRow.model_fields}
    row.update(variant=variant.variant, method="FP", status="reference", reason="floating-point model",
               final=variant.fp_map50_95, best=variant.fp_map50_95, comparable=True)
    return row


def _variant_order(variants: set[str]) -> list[str]:
    return sorted(variants, key=lambda v: (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS), v))


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _at(value: float | None, first: int | None, last: int | None) -> str:
    """A value and the epoch it was measured at, or the span of epochs its window median covers."""
    if last is None:
        return _num(value)
    return f"{_num(value)} ({last})" if first is None or first == last else f"{_num(value)} ({first}-{last})"


def _cell(cell: GridCell) -> str:
    if not cell.seeds:
        return "–"
    spread = f" ± {_num(cell.std_final)}" if cell.std_final is not None else ""
    return f"{_num(cell.mean_final)}{spread} ({cell.seeds}, {cell.failed} failed)"


def _paired_table(contrasts: Sequence[PairedDifference]) -> str:
    return _markdown_table(
        ["contrast", "seeds", "mean", "SE", "95 % CI", "sign-flip p", "real"],
        [[c.contrast, str(c.n), _num(c.mean, 4, signed=True), _num(c.standard_error),
          "–" if c.ci_low is None else f"{c.ci_low:+.4f} to {c.ci_high:+.4f}", _num(c.p_sign_flip, 3),
          _yes_no(c.real)] for c in contrasts],
    )


def _within_seed_section(variant: VariantComparison) -> str:
    """Each seed's EMA − baseline with its within-seed (val-image) interval, next to the across-seed t-interval."""
    heading = "**Within-seed uncertainty of EMA − baseline** (val-image sampling only, not training noise):"
    if not variant.within_seed:
        return f"{heading} not recorded (no paired seed whose run summaries carry the bootstrap)."
    across = next((c for c in variant.against_baseline if c.contrast == "ema - baseline"), None)
    rows = [[str(r.seed), _num(r.difference, 4, signed=True),
             f"{_num(w.difference, 4, signed=True)} (epoch {w.epoch})",
             f"{w.ci_low:+.4f} to {w.ci_high:+.4f}", "within seed: val images only", _num(w.std), _num(w.unpaired_std),
             f"{w.images} × {w.resamples} (seed {w.seed})"]
            for r in variant.within_seed for w in [r.within_seed]]
    if across is not None:
        rows.append([f"across {across.n} seed(s)", _num(across.mean, 4, signed=True), "–",
                     "–" if across.ci_low is None else f"{across.ci_low:+.4f} to {across.ci_high:+.4f}",
                     "across seeds: t-interval, training noise included", f"SE {_num(across.standard_error)}", "–", "–"])
    return "\n\n".join([
        f"{heading} the seed's final EMA copy and live weights come from one training and are scored on the same "
        "val images; a paired bootstrap resamples the images together (95 % percentile interval). It says how far "
        "the choice of val images alone could move the seed's difference, which is measured at the last "
        "validation (the paired table's finals are window medians). The across-seed row is the paired t-interval "
        "above, whose spread also holds training noise.",
        _markdown_table(
            ["seed", "ema − baseline (final)", "ema − live, last validation", "95 % interval", "interval of",
             "std (paired)", "std (unpaired)", "images × resamples"],
            rows,
        ),
    ])


def _seed_evidence_table(evidence: EvidenceVerdict) -> str:
    return _markdown_table(
        ["seed", "baseline best", "line (ratio × best)", "baseline final", "ema+QC final", "margin", "outcome"],
        [[str(s.seed), _num(s.baseline_best), _num(s.line), _num(s.baseline_final), _num(s.ema_qc_final),
          _num(s.margin), s.outcome.replace("_", " ")] for s in evidence.seeds],
    )


def _seeds_note(variant: VariantComparison) -> str:
    """How far the exact tests can go with the seeds at hand, and how many seeds p < 0.05 needs."""
    n = max((c.n for c in variant.against_baseline), default=0)
    one, two = seeds_needed(0.05), seeds_needed(0.05, one_sided=False)
    reach = (f"With {n} seed(s) the smallest attainable exact p is {1 / 2**n:.3g} one-sided and "
             f"{min(1.0, 2 / 2**n):.3g} two-sided" if n else "No paired seeds yet")
    return (f"{reach}; one-sided p < 0.05 needs {one} seeds (`QAT_SEEDS={','.join(map(str, range(one)))}`), "
            f"two-sided {two}.")


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])
