"""`comparison` (tables, plots, summary.md) and `gate` (the decision, with its blocking check)."""

import json
from pathlib import Path

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from qat_assets.core import layout
from qat_assets.core.artifacts import read_sidecar, write_json_atomic, write_text_atomic
from qat_assets.core.comparison import build_comparison, deployment_markdown
from qat_assets.core.gate import GateDecision, decide_gate
from qat_assets.core.plots import plot_map_curves, render_summary_md
from qat_assets.core.settings import METHODS, VALIDATION_VARIANTS, Settings
from qat_assets.core.summary import RunSummary
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
    )


@asset(group_name="decision", deps=VERDICT_KEYS + ONNX_KEYS, kinds={"python"})
def comparison(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
    """baseline / baseline+QC / EMA / EMA+QC per variant and seed, means over seeds, plots and summary.md."""
    settings = experiment.settings()
    out_dir = layout.comparison_dir(settings.artifact_root())
    summaries = collect_summaries(settings)
    references = fp_references(settings)
    onnx_results = collect_onnx_results(settings)
    result = build_comparison(summaries, references, onnx_results)
    plots: dict[str, Path] = {}
    for variant in VALIDATION_VARIANTS:
        runs = [s for s in summaries if s.variant == variant]
        plots[variant] = plot_map_curves(
            runs, out_dir / f"{variant}_map50_95.png", f"{variant} W4A16 QAT: mAP50-95 per epoch",
            fp_map50_95=references.get(variant, {}).get("map50_95"),
        )
    decision = gate_decision(settings, summaries, references)
    summary_md = write_text_atomic(
        out_dir / "summary.md",
        render_summary_md(result, decision, plots, relative_to=out_dir) + "\n" + deployment_markdown(onnx_results),
    )
    write_json_atomic(out_dir / "comparison.json", result.to_dict())
    context.log.info(f"{len(summaries)} run summaries compared; {decision.headline()}")
    return MaterializeResult(
        metadata={
            "runs": len(summaries),
            "table": MetadataValue.md(result.to_markdown()),
            "summary_md": MetadataValue.path(str(summary_md)),
            **{f"{v}_plot": MetadataValue.md(png_markdown(p, f"{v}: mAP50-95 per epoch")) for v, p in plots.items()},
            "gate_preview": decision.headline(),
        }
    )


@asset(group_name="decision", deps=[comparison], kinds={"python"})
def gate(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
    """Passes only if, for yolo10n and yolo10s, enough EMA+QC seeds are complete, comparable and stable.

    Always materializes: the decision (passed or not, with every reason) is the data.
    """
    settings = experiment.settings()
    decision = gate_decision(settings, collect_summaries(settings), fp_references(settings))
    path = write_json_atomic(layout.gate_file(settings.artifact_root()), decision.to_dict())
    for line in [decision.headline(), *decision.reasons]:
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
        }
    )


@asset_check(asset=gate, blocking=True, description="Mirrors the gate decision; blocks downstream work when it fails.")
def gate_passed(context: AssetCheckExecutionContext, experiment: ExperimentSettings) -> AssetCheckResult:
    path = layout.gate_file(experiment.settings().artifact_root())
    decision = GateDecision.from_dict(json.loads(path.read_text())) if path.is_file() else None
    if decision is None:
        return AssetCheckResult(passed=False, severity=AssetCheckSeverity.ERROR, description="gate.json is missing")
    return AssetCheckResult(
        passed=decision.passed,
        severity=AssetCheckSeverity.ERROR,
        description=decision.headline(),
        metadata={"reasons": MetadataValue.json(decision.reasons)},
    )
