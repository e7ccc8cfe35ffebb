"""`comparison` (tables, plots, summary.md) and `gate` (the decision, with its blocking check)."""

import hashlib
import json

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from qat_assets.core import layout
from qat_assets.core.artifacts import read_sidecar, write_json_atomic
from qat_assets.core.comparison import build_comparison
from qat_assets.core.gate import EVIDENCE_CHECK, GateDecision, decide_gate, evidence_check_outcome
from qat_assets.core.plots import write_comparison_report
from qat_assets.core.settings import METHODS, VALIDATION_VARIANTS, Settings
from qat_assets.core.summary import RunSummary
from qat_assets.defs.decision.gating import GATE_KEY
from qat_assets.defs.metadata import png_markdown
from qat_assets.defs.resources import ExperimentSettings

VERDICT_KEYS = [AssetKey([variant, "stability_verdict"]) for variant in VALIDATION_VARIANTS]
ONNX_KEYS = [AssetKey([variant, "onnx_model"]) for variant in VALIDATION_VARIANTS]  # the report's ONNX mAP column


def collect_summaries(settings: Settings) -> list[RunSummary]:
    """Every run_summary.json of the validation variants for the configured seeds (missing ones are skipped)."""
    root = settings.artifact_root()
    paths = [
        layout.run_dir(root, variant, "stability_verdict", method, seed) / "run_summary.json"
        for variant in VALIDATION_VARIANTS for method in METHODS for seed in settings.seeds
    ]
    return [RunSummary.read(path) for path in paths if path.is_file()]


def fp_references(settings: Settings) -> dict[str, dict]:
    references = {}
    for variant in VALIDATION_VARIANTS:
        sidecar_path = layout.pretrained_dir(settings.artifact_root(), variant) / "pretrained.json"
        if sidecar_path.is_file():
            sidecar = read_sidecar(sidecar_path.with_suffix(".pt"))
            references[variant] = {**sidecar["metrics"], "dataset_fingerprint": sidecar["dataset_fingerprint"]}
    return references


def collect_onnx_results(settings: Settings) -> list[dict]:
    """Results of the `{v}/onnx_model` partitions materialized so far (optional: the report shows what exists)."""
    root = settings.artifact_root()
    paths = [
        layout.run_dir(root, variant, "onnx_model", method, seed) / "onnx_model.json"
        for variant in VALIDATION_VARIANTS for method in METHODS for seed in settings.seeds
    ]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def gate_decision(settings: Settings, summaries: list[RunSummary], references: dict[str, dict]) -> GateDecision:
    return decide_gate(
        summaries, seeds=list(settings.seeds), variants=VALIDATION_VARIANTS, min_seeds=settings.gate_min_seeds,
        fp_dataset_fingerprints={v: r["dataset_fingerprint"] for v, r in references.items()},
        require_informative=settings.gate_require_informative,
    )


def decision_data_version(decision: GateDecision, summaries: list[RunSummary], references: dict[str, dict],
                          onnx_results: list[dict] | None = None) -> DataVersion:
    """A hash of the decision and of the evidence it was made from: the run summaries, the FP references and
    (for the comparison) the ONNX results. Materializing again on unchanged evidence gives the same version,
    so the UI does not mark downstream stale and the yolo10m sensor does not start over (automation/sensors.py)."""
    evidence = {
        "decision": decision.to_dict(),
        # Without the time a summary was written: a verdict written again from the same checkpoints is the same evidence.
        "summaries": sorted(
            (s.model_dump(mode="json", exclude={"created_at"}) for s in summaries), key=lambda s: json.dumps(s, sort_keys=True)
        ),
        "references": references,
        "onnx_results": onnx_results,
    }
    return DataVersion(hashlib.sha256(json.dumps(evidence, sort_keys=True, default=str).encode()).hexdigest()[:16])


@asset(group_name="decision", deps=VERDICT_KEYS + ONNX_KEYS, kinds={"python"})
def comparison(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
    """baseline / baseline+QC / EMA / EMA+QC per variant and seed, means over seeds, plots and summary.md."""
    settings = experiment.settings()
    summaries = collect_summaries(settings)
    references = fp_references(settings)
    onnx_results = collect_onnx_results(settings)
    result = build_comparison(summaries, references, onnx_results)
    decision = gate_decision(settings, summaries, references)
    report = write_comparison_report(
        result, decision, summaries, {v: r.get("map50_95") for v, r in references.items()}, VALIDATION_VARIANTS,
        layout.comparison_dir(settings.artifact_root()), onnx_results,
    )
    context.log.info(f"{len(summaries)} run summaries compared; {decision.headline()}")
    return MaterializeResult(
        metadata={
            "runs": len(summaries),
            "table": MetadataValue.md(result.to_markdown()),
            "summary_md": MetadataValue.path(str(report.summary_md)),
            **{
                f"{v}_plot": MetadataValue.md(png_markdown(p, f"{v}: mAP50-95 per epoch"))
                for v, p in report.plots.items()
            },
            "gate_preview": decision.headline(),
            "evidence": MetadataValue.md("\n".join(f"- {line}" for line in result.evidence_lines()) or "- no runs"),
        },
        data_version=decision_data_version(decision, summaries, references, onnx_results),
    )


# The gate's checks, evaluated from the decision the gate has just made (no second read of gate.json).
# One spec and one result function per check: a new check is one more entry in each.
GATE_CHECK_SPECS = [
    AssetCheckSpec(
        "gate_passed", asset=GATE_KEY, blocking=True,
        description="The gate decision; blocks the yolo10m chain (downstream of gate) when it fails.",
    ),
    AssetCheckSpec(
        EVIDENCE_CHECK, asset=GATE_KEY, blocking=False,
        description="WARN when the evidence is uninformative: the baseline never collapsed",
    ),
]


def gate_passed_result(decision: GateDecision) -> AssetCheckResult:
    return AssetCheckResult(
        check_name="gate_passed",
        passed=decision.passed,
        severity=AssetCheckSeverity.ERROR,
        description=decision.headline(),
        metadata={"reasons": MetadataValue.json(decision.reasons)},
    )


def evidence_informative_result(decision: GateDecision) -> AssetCheckResult:
    outcome = evidence_check_outcome(decision)
    return AssetCheckResult(
        check_name=EVIDENCE_CHECK, passed=outcome.passed, severity=AssetCheckSeverity.WARN,
        description=outcome.description,
    )


def gate_check_results(decision: GateDecision) -> list[AssetCheckResult]:
    return [gate_passed_result(decision), evidence_informative_result(decision)]


@asset(key=GATE_KEY, group_name="decision", deps=[comparison], kinds={"python"}, check_specs=GATE_CHECK_SPECS)
def gate(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
    """Passes only if, for yolo10n and yolo10s, enough EMA+QC seeds are complete, comparable and stable.

    Always materializes: the decision (passed or not, with every reason) is the data. Its blocking
    check `gate_passed` carries the same decision, so a failing gate stops the yolo10m chain.
    """
    settings = experiment.settings()
    summaries, references = collect_summaries(settings), fp_references(settings)
    decision = gate_decision(settings, summaries, references)
    path = write_json_atomic(layout.gate_file(settings.artifact_root()), decision.to_dict())
    for line in [decision.headline(), *decision.reasons, *decision.evidence_lines()]:
        (context.log.info if decision.passed else context.log.warning)(line)
    return MaterializeResult(
        metadata={
            "passed": decision.passed,
            "headline": decision.headline(),
            "reasons": MetadataValue.json(decision.reasons),
            "reasons_md": MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons) or "- none"),
            "min_seeds": decision.min_seeds,
            "seeds": MetadataValue.json(list(settings.seeds)),
            "gate_json": MetadataValue.path(str(path)),
            "evidence": MetadataValue.md("\n".join(f"- {line}" for line in decision.evidence_lines()) or "- none"),
            "evidence_informative": decision.informative,
            "require_informative": decision.require_informative,
        },
        check_results=gate_check_results(decision),
        data_version=decision_data_version(decision, summaries, references),
    )
