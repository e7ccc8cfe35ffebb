"""The per-variant assets, built by one factory: `{v}/pretrained_checkpoint`, `{v}/qat_checkpoint`,
`{v}/qc_checkpoint`, `{v}/stability_verdict` and `{v}/onnx_model` (all but the first partitioned by method × seed).

Heavy steps run in a worker process under the `gpu` pool; the functions here only assemble the
request, hand it to the launcher and turn the result into metadata.
"""

from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    Failure,
    MaterializeResult,
    asset,
)

from qat_assets.defs.dataset import calibration_subset, coco_subset
from qat_assets.core import layout
from qat_assets.core.artifacts import ArtifactError, read_sidecar, sha256_file
from qat_assets.core.calibration import CalibrationResult
from qat_assets.core.code_versions import source_code_version
from qat_assets.core.coco import SubsetResult
from qat_assets.core.requests import ExportRequest, PretrainRequest, QATRequest, QCRequest
from qat_assets.core.verdict import build_run_summary
from qat_assets.defs.decision.gating import GATE_KEY, require_passing_gate
from qat_assets.core.settings import Settings
from qat_assets.defs.metadata import (
    clear_failures,
    history_table,
    onnx_metadata,
    pretrain_metadata,
    qat_metadata,
    qc_metadata,
    verdict_metadata,
)
from qat_assets.defs.variant.partitions import method_and_seed, run_partitions
from qat_assets.defs.resources import ExperimentSettings
from qat_assets.execution.launcher import HeavyStepLauncher

HEAVY_POOL = "gpu"
# The core module each step runs. Its code version is derived from the source of that module and of every
# package module it imports (core/code_versions.py), so the UI marks materializations stale after a change
# of the training, QAT, QC or export code.
STEP_MODULES = {
    "pretrained_checkpoint": "pretrain",
    "qat_checkpoint": "qat",
    "qc_checkpoint": "qc_stage",
    "stability_verdict": "verdict",
    "onnx_model": "export_stage",
}
CODE_VERSIONS = {stage: source_code_version(module) for stage, module in STEP_MODULES.items()}


def checkpoint_result(metadata: dict, result: dict) -> MaterializeResult:
    """The materialization of a heavy step: its metadata, and the checkpoint's sha256 as the data version."""
    return MaterializeResult(metadata=metadata, data_version=DataVersion(result["sha256"]))


def read_upstream_sidecar(checkpoint: Path, upstream_asset: str, partition: str | None = None) -> dict:
    """The sidecar of an upstream checkpoint, or a Failure telling which asset to materialize first."""
    try:
        return read_sidecar(checkpoint)
    except ArtifactError:
        where = f" for partition {partition}" if partition else ""
        raise Failure(description=f"{upstream_asset}{where} is not materialized yet ({checkpoint} is missing); materialize it first") from None


@dataclass(frozen=True)
class StageInputs:
    """What every stage of a variant starts from: settings, artifact root, the subset, the partition."""

    settings: Settings
    root: Path
    subset: SubsetResult
    method: str | None
    seed: int | None


def variant_assets(variant: str, seeds: tuple[int, ...], gated: bool) -> list[AssetsDefinition]:
    """`gated`: the chain sits downstream of `gate` (whose blocking check then stops it) and each step
    also refuses to run, with the gate's reasons, when launched by hand behind a gate that did not pass."""
    partitions = run_partitions(seeds)
    group = variant
    pretrained_deps = [coco_subset, GATE_KEY] if gated else [coco_subset]

    def stage_inputs(context: AssetExecutionContext, experiment: ExperimentSettings, asset_name: str) -> StageInputs:
        if gated:
            state = require_passing_gate(context.instance, f"{variant}/{asset_name}")
            context.log.info(f"gate passed (version {state.data_version}); running {variant}/{asset_name}")
        with clear_failures():
            settings = experiment.settings()
            subset = SubsetResult.read(layout.subset_dir(settings.artifact_root()))
        method, seed = method_and_seed(context.partition_key) if context.has_partition_key else (None, None)
        return StageInputs(settings, settings.artifact_root(), subset, method, seed)

    @asset(key_prefix=[variant], name="pretrained_checkpoint", group_name=group, deps=pretrained_deps, pool=HEAVY_POOL, kinds={"pytorch"},
            code_version=CODE_VERSIONS["pretrained_checkpoint"])
    def pretrained_checkpoint(
        context: AssetExecutionContext, experiment: ExperimentSettings, launcher: HeavyStepLauncher
    ) -> MaterializeResult:
        """Floating-point starting point: the user's yolov10 weights (QAT_CHECKPOINT_DIR), or trained here."""
        inputs = stage_inputs(context, experiment, "pretrained_checkpoint")
        subset = inputs.subset
        out_dir = layout.pretrained_dir(inputs.root, variant)
        request = PretrainRequest(
            variant=variant, dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
            names=subset.class_names, train_images=subset.counts["train"]["images"], out_dir=out_dir,
            settings=inputs.settings,
        )
        result = launcher.run(context, "pretrain", request, out_dir)
        return checkpoint_result(pretrain_metadata(result), result)

    @asset(
        key_prefix=[variant], name="qat_checkpoint", group_name=group, partitions_def=partitions,
        deps=[pretrained_checkpoint], pool=HEAVY_POOL, kinds={"pytorch"}, code_version=CODE_VERSIONS["qat_checkpoint"],
    )
    def qat_checkpoint(
        context: AssetExecutionContext, experiment: ExperimentSettings, launcher: HeavyStepLauncher
    ) -> MaterializeResult:
        """W4A16 QAT from the pretrained checkpoint; `baseline` = the live weights, `ema` = the paper's EMA copy, of one shared training per seed."""
        inputs = stage_inputs(context, experiment, "qat_checkpoint")
        subset = inputs.subset
        pretrained = layout.pretrained_dir(inputs.root, variant) / "pretrained.pt"
        sidecar = read_upstream_sidecar(pretrained, f"{variant}/pretrained_checkpoint")
        out_dir = layout.run_dir(inputs.root, variant, "qat_checkpoint", inputs.method, inputs.seed)
        request = QATRequest(
            variant=variant, method=inputs.method, seed=inputs.seed, pretrained_checkpoint=pretrained,
            pretrained_sha256=sidecar["sha256"], dataset_yaml=subset.dataset_yaml,
            dataset_fingerprint=subset.fingerprint, train_images=subset.counts["train"]["images"],
            out_dir=out_dir, trajectory_dir=layout.qat_trajectory_dir(inputs.root, variant, inputs.seed),
            settings=inputs.settings,
        )
        result = launcher.run(context, "qat", request, out_dir)
        if result.get("diverged_at_epoch"):
            context.log.warning(f"{variant} {context.partition_key}: diverged at epoch {result['diverged_at_epoch']}")
        return checkpoint_result(qat_metadata(result), result)

    @asset(
        key_prefix=[variant], name="qc_checkpoint", group_name=group, partitions_def=partitions,
        deps=[qat_checkpoint, calibration_subset], pool=HEAVY_POOL, kinds={"pytorch"},
        code_version=CODE_VERSIONS["qc_checkpoint"],
    )
    def qc_checkpoint(
        context: AssetExecutionContext, experiment: ExperimentSettings, launcher: HeavyStepLauncher
    ) -> MaterializeResult:
        """Quantization Correction: per-channel gamma/beta after each quantized conv, one epoch on D_c, folded."""
        inputs = stage_inputs(context, experiment, "qc_checkpoint")
        with clear_failures():
            calibration = CalibrationResult.read(layout.calibration_dir(inputs.root))
        qat = layout.run_dir(inputs.root, variant, "qat_checkpoint", inputs.method, inputs.seed) / "qat_checkpoint.pt"
        sidecar = read_upstream_sidecar(qat, f"{variant}/qat_checkpoint", context.partition_key)
        out_dir = layout.run_dir(inputs.root, variant, "qc_checkpoint", inputs.method, inputs.seed)
        request = QCRequest(
            variant=variant, method=inputs.method, seed=inputs.seed, qat_checkpoint=qat, qat_sha256=sidecar["sha256"],
            calibration_yaml=calibration.dataset_yaml, calibration_fingerprint=calibration.fingerprint,
            dataset_yaml=inputs.subset.dataset_yaml, out_dir=out_dir, settings=inputs.settings,
        )
        result = launcher.run(context, "qc", request, out_dir)
        if result.get("skipped"):  # no checkpoint: the reason is the data
            return MaterializeResult(metadata=qc_metadata(result), data_version=DataVersion(f"skipped: {result['skipped']}"))
        return checkpoint_result(qc_metadata(result), result)

    @asset(
        key_prefix=[variant], name="stability_verdict", group_name=group, partitions_def=partitions,
        deps=[qat_checkpoint, qc_checkpoint], kinds={"python"}, code_version=CODE_VERSIONS["stability_verdict"],
    )
    def stability_verdict(context: AssetExecutionContext, experiment: ExperimentSettings) -> MaterializeResult:
        """`run_summary.json`, classified twice: the QAT run alone, and QAT + QC."""
        inputs = stage_inputs(context, experiment, "stability_verdict")
        root, method, seed, subset = inputs.root, inputs.method, inputs.seed, inputs.subset
        qat = read_upstream_sidecar(
            layout.run_dir(root, variant, "qat_checkpoint", method, seed) / "qat_checkpoint.pt",
            f"{variant}/qat_checkpoint", context.partition_key,
        )
        qc_path = layout.run_dir(root, variant, "qc_checkpoint", method, seed) / "qc_checkpoint.pt"
        qc = read_sidecar(qc_path) if qc_path.with_suffix(".json").is_file() else None
        summary = build_run_summary(
            qat, qc, partition_key=str(context.partition_key), settings=inputs.settings,
            dataset={"fingerprint": subset.fingerprint, "source": subset.source, "counts": subset.counts,
                     "classes": subset.class_names},
        )
        path = summary.write(layout.run_dir(root, variant, "stability_verdict", method, seed) / "run_summary.json")
        context.log.info(
            f"{variant} {context.partition_key}: QAT {summary.stability_qat.status} ({summary.stability_qat.reason}); "
            f"QAT+QC {summary.stability_qat_qc.status} ({summary.stability_qat_qc.reason})"
        )
        return MaterializeResult(
            metadata={**verdict_metadata(summary, path), "history": history_table(qat["history"])},
            data_version=DataVersion(sha256_file(path)),
        )

    @asset(
        key_prefix=[variant], name="onnx_model", group_name=group, partitions_def=partitions,
        deps=[qc_checkpoint, pretrained_checkpoint], pool=HEAVY_POOL, kinds={"onnx"},
        code_version=CODE_VERSIONS["onnx_model"],
        check_specs=[AssetCheckSpec(
            "onnx_matches_pytorch", asset=AssetKey([variant, "onnx_model"]), blocking=True,
            description="onnxruntime reproduces the PyTorch fake-quant model: raw head outputs and val mAP",
        )],
    )
    def onnx_model(
        context: AssetExecutionContext, experiment: ExperimentSettings, launcher: HeavyStepLauncher
    ) -> MaterializeResult:
        """Deployable W4A16 QCDQ ONNX (Brevitas) of the QC-folded model (or, by setting, the QAT checkpoint) and
        the FP reference ONNX, checked against PyTorch in onnxruntime."""
        inputs = stage_inputs(context, experiment, "onnx_model")
        source = inputs.settings.onnx_source
        stage = "qc_checkpoint" if source == "qc" else "qat_checkpoint"
        checkpoint = layout.run_dir(inputs.root, variant, stage, inputs.method, inputs.seed) / f"{stage}.pt"
        sidecar = read_upstream_sidecar(checkpoint, f"{variant}/{stage}", context.partition_key)
        pretrained = layout.pretrained_dir(inputs.root, variant) / "pretrained.pt"
        pretrained_sidecar = read_upstream_sidecar(pretrained, f"{variant}/pretrained_checkpoint")
        out_dir = layout.run_dir(inputs.root, variant, "onnx_model", inputs.method, inputs.seed)
        request = ExportRequest(
            variant=variant, method=inputs.method, seed=inputs.seed, source=source, checkpoint=checkpoint,
            checkpoint_sha256=sidecar.get("sha256", ""), pretrained_checkpoint=pretrained,
            pretrained_sha256=pretrained_sidecar["sha256"], dataset_yaml=inputs.subset.dataset_yaml,
            out_dir=out_dir, settings=inputs.settings,
        )
        result = launcher.run(context, "export", request, out_dir)
        failures = [result["skipped"]] if result.get("skipped") else result["failures"]
        check = AssetCheckResult(
            check_name="onnx_matches_pytorch", passed=not failures,
            # A diverged run has no model to deploy: reported, but not an export fault that blocks anything.
            severity=AssetCheckSeverity.WARN if result.get("skipped") else AssetCheckSeverity.ERROR,
            description="; ".join(failures) if failures else "raw head outputs and mAP match PyTorch within the goals",
            metadata={k: result[k] for k in ("parity", "map_delta") if k in result},
        )
        data_version = DataVersion(result.get("w4_sha256") or f"skipped: {result.get('skipped')}")
        return MaterializeResult(metadata=onnx_metadata(result), check_results=[check], data_version=data_version)

    return [pretrained_checkpoint, qat_checkpoint, qc_checkpoint, stability_verdict, onnx_model]
