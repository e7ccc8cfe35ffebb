"""Worker results and summaries turned into Dagster metadata: numbers, tables and paths a person reads."""

import base64
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dagster import Failure, MetadataValue, TableColumn, TableRecord, TableSchema

from qat_assets.core.artifacts import ArtifactError
from qat_assets.core.coco import DatasetError
from qat_assets.core.diagnostics_report import LAYER_COLUMNS, MODEL_COLUMNS, last_diagnostics, model_rows
from qat_assets.core.settings import SettingsError
from qat_assets.core.summary import RunSummary

HISTORY_COLUMNS = (
    ("epoch", "int"), ("map50_95", "float"), ("map50", "float"), ("precision", "float"), ("recall", "float"),
    ("box_loss", "float"), ("cls_loss", "float"), ("dfl_loss", "float"), ("lr", "float"),
    ("oscillating_fraction", "float"), ("seconds", "float"), ("validation_seconds", "float"),
)


@contextmanager
def clear_failures() -> Iterator[None]:
    """Bad inputs fail the step with their one-sentence message, not a stack trace."""
    try:
        yield
    except (DatasetError, ArtifactError, SettingsError) as exc:
        raise Failure(description=str(exc)) from None


def table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> MetadataValue:
    schema = TableSchema(columns=[TableColumn(name, kind) for name, kind in columns])
    records = [
        TableRecord({name: _cell(row.get(name), kind) for name, kind in columns}) for row in rows
    ]
    return MetadataValue.table(records=records, schema=schema)


def _cell(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "float":
        return round(float(value), 5)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    return str(value)


def history_table(history: list[dict[str, Any]]) -> MetadataValue:
    return table(history, HISTORY_COLUMNS)


def checkpoint_metadata(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "checkpoint": MetadataValue.path(result["checkpoint"]),
        "sha256": result["sha256"],
        "wall_time_s": round(float(result["seconds"]), 1),
        "device": result["device"],
        # FP and QAT steps: the precision they trained in (none: older sidecars, other stages, no FP epochs here).
        **({"training_precision": result["training_precision"]} if result.get("training_precision") else {}),
        "settings": MetadataValue.json(result["settings"]),
        "execution": MetadataValue.json(result["execution"]),  # launcher, GPU / Ray job: where the step ran
    }


def pretrain_metadata(result: dict[str, Any]) -> dict[str, Any]:
    metrics = result["metrics"]
    return {
        **checkpoint_metadata(result),
        "source": result["source"],
        "head": MetadataValue.json(result["head"]),
        "epochs_trained": result["epochs_trained"],
        "mAP50-95(B)": metrics["map50_95"],
        "mAP50(B)": metrics["map50"],
        "precision(B)": metrics["precision"],
        "recall(B)": metrics["recall"],
        "evaluation": MetadataValue.json(result["evaluation"]),
        "dataset_fingerprint": result["dataset_fingerprint"],
        "history": history_table(result["history"]),
        # Older sidecars predate the plateau check and the recorded EMA schedule.
        "plateau_check": result.get("plateau", {}).get("reason", "not recorded"),
        "at_plateau": str(result.get("plateau", {}).get("at_plateau")),
        # The LR the plateau was measured at: flat at a tiny LR does not mean flat at QAT's.
        "plateau_window_max_lr": str(result.get("plateau", {}).get("window_max_lr")),
        "ema": MetadataValue.json(result.get("ema") or {}),
        # The batch it trained at: Ultralytics halves the configured one after an out-of-memory error.
        "training_batch": MetadataValue.json(result.get("training_batch") or {}),
    }


def qat_metadata(result: dict[str, Any]) -> dict[str, Any]:
    trained = [h for h in result["history"] if h["epoch"] > 0]
    validated = [h for h in trained if h["map50_95"] is not None]  # qat_val_interval may skip epochs
    best = max(validated, key=lambda h: h["map50_95"], default=None)
    final = validated[-1] if validated else None
    epoch_seconds = [h["seconds"] for h in trained if h.get("seconds") is not None]
    return {
        **checkpoint_metadata(result),
        "partition": f"{result['method']}|{result['seed']}",
        "status": f"diverged at epoch {result['diverged_at_epoch']}" if result["diverged_at_epoch"] else
        f"{result['completed_epochs']}/{result['planned_epochs']} epochs",
        "resume": result["resume"],
        # Both methods of a seed share one training; the second to run waits for it, then reuses it.
        "trajectory": MetadataValue.json(result.get("trajectory") or {}),
        "ptq_map50_95": result["ptq_map50_95"],
        "fp_map50_95": result["fp_map50_95"],
        "best_map50_95": best["map50_95"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_map50_95": final["map50_95"] if final else None,
        "final_epoch": final["epoch"] if final else None,
        "validated_epochs": f"{len(validated)} of {len(trained)} trained",
        # YOLOv10's NMS-free head, the same weights' one-to-one branch (Ultralytics' nms=False), FP and final.
        "fp_one_to_one_map50_95": result["one_to_one"]["fp"]["map50_95"],
        "final_one_to_one_map50_95": (result["one_to_one"]["final"] or {}).get("map50_95"),
        # The batch it trained at; a batch Ultralytics halved after an OOM makes the run not comparable.
        "training_batch": MetadataValue.json(result.get("training_batch") or {}),
        # EMA - live of the seed's final weights with its paired bootstrap over val images (core/within_seed.py).
        "within_seed": MetadataValue.json(result.get("within_seed") or {}),
        "mean_epoch_wall_time_s": round(sum(epoch_seconds) / len(epoch_seconds), 1) if epoch_seconds else None,
        "ema": MetadataValue.json(result["ema"]),
        "history": history_table(result["history"]),
        # Why a run collapses (core/diagnostics.py): the model-level figures per epoch, the layers at the end.
        "diagnostics": table(model_rows(result["history"]), MODEL_COLUMNS),
        "diagnostics_layers_last_epoch": table((last_diagnostics(result["history"]) or {}).get("layers", []), LAYER_COLUMNS),
        "diagnostics_bn_last_epoch": table((last_diagnostics(result["history"]) or {}).get("bn", []),
                                           (("name", "string"), ("log_var_mismatch", "float"))),
        "quantization_counts": MetadataValue.json(result["quantization_counts"]),
        "quantization_report": table(
            result["quantization"]["layers"],
            (("name", "string"), ("bit_width", "int"), ("reason", "string"), ("out_channels", "int")),
        ),
    }


def qc_metadata(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("skipped"):
        return {"skipped": result["skipped"]}
    return {
        **checkpoint_metadata(result),
        "map50_95_before": result["map50_95_before"],
        "map50_95_after": result["map50_95_after"],
        "delta": result["delta"],
        "map50_before": result["map50_before"],
        "map50_after": result["map50_after"],
        "max_fold_rel_diff": result["max_fold_rel_diff"],
        "qc_settings": MetadataValue.json(result["qc_settings"]),
        "qc_steps": result["qc_settings"]["steps"],
        "qc_lr": result["qc_settings"]["lr"],
        "qc_calibration_images": result["qc_settings"]["calibration_images"],
        "max_abs_gamma_minus_1": max((r["max_abs_gamma_minus_1"] for r in result["layer_stats"]), default=None),
        "max_abs_beta": max((r["max_abs_beta"] for r in result["layer_stats"]), default=None),
        "corrections": table(
            result["layer_stats"],
            (("name", "string"), ("max_abs_gamma_minus_1", "float"), ("max_abs_beta", "float"),
             ("mean_abs_gamma_minus_1", "float"), ("mean_abs_beta", "float")),
        ),
        "bn_map50_95_before": result["bn_reestimation"]["map50_95_before"],
        "bn_map50_95_after": result["bn_reestimation"]["map50_95_after"],
        "bn_delta": result["bn_reestimation"]["delta"],
        "bn_reestimation": MetadataValue.json(result["bn_reestimation"]),
    }


def onnx_metadata(result: dict[str, Any]) -> dict[str, Any]:
    """Where the deployable files are, what their weights are stored as, and how closely onnxruntime matches."""
    if result.get("skipped"):
        return {"skipped": result["skipped"]}
    parity, onnx_map, torch_map = result["parity"], result["onnx_metrics"], result["torch_metrics"]
    return {
        "source": result["source"],
        "w4_onnx": MetadataValue.path(result["w4_onnx"]),
        "w4_bytes": result["w4_bytes"],
        "fp_onnx": MetadataValue.path(result["fp_onnx"]),
        "fp_bytes": result["fp_bytes"],
        "w4_over_fp_size": round(result["w4_bytes"] / result["fp_bytes"], 4),
        "w4_sha256": result["w4_sha256"],
        "int4_onnx": MetadataValue.path(result["int4"]["path"]) if result.get("int4") else "not written (QAT_ONNX_INT4=false)",
        "int4_bytes": result["int4"]["bytes"] if result.get("int4") else None,
        "int4_floor_bytes": result["int4"]["floor_bytes"] if result.get("int4") else None,
        "int4_onnx_map50_95": result["int4"]["onnx_metrics"]["map50_95"] if result.get("int4") else None,
        **({f"e2e_{key}": value for key, value in (
            ("onnx", MetadataValue.path(result["end2end"]["path"])), ("bytes", result["end2end"]["bytes"]),
            ("output_shape", MetadataValue.json(result["end2end"]["output_shape"])),
            ("parity_max_rel", result["end2end"]["parity"]["max_rel"]),
            ("onnx_map50_95", result["end2end"]["onnx_metrics"]["map50_95"]),
            ("torch_map50_95", result["end2end"]["torch_metrics"]["map50_95"]),
        )} if result.get("end2end") else {}),
        "int4_max_rel_vs_qcdq": result["int4"]["max_rel_vs_qcdq"] if result.get("int4") else None,
        "opset": result["opset"],
        "format": result["format"],
        "weight_tensors": MetadataValue.json(result["weight_tensors"]),
        "onnxruntime": result["runtime"]["onnxruntime"],
        "providers": MetadataValue.json(result["runtime"]["providers"]),
        "parity_images": result["parity_images"],
        "parity_max_abs": parity["max_abs"],
        "parity_max_rel": parity["max_rel"],
        "onnx_map50_95": onnx_map["map50_95"],
        "onnx_map50": onnx_map["map50"],
        "torch_map50_95": torch_map["map50_95"],
        "torch_map50": torch_map["map50"],
        "map50_95_delta": result["map_delta"]["map50_95"],
        "onnx_eval_provider": result["evaluation_scope"]["provider"],
        "onnx_eval_images": result["evaluation_scope"]["images"],
        "map50_delta": result["map_delta"]["map50"],
        "first_divergence": MetadataValue.json(result["first_divergence"] or {}),
        "layer_parity": table(
            result["layer_parity"],
            (("layer", "string"), ("max_abs", "float"), ("max_rel", "float"), ("tensor", "string"), ("note", "string")),
        ),
        "op_counts": MetadataValue.json(result["op_counts"]),
        "evaluation": MetadataValue.json(result["evaluation"]),
        "wall_time_s": round(float(result["seconds"]), 1),
        "execution": MetadataValue.json(result["execution"]),  # launcher, GPU / Ray job: where the step ran
    }


def verdict_metadata(summary: RunSummary, path: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = {"run_summary": MetadataValue.path(str(path))}
    outcomes = (("qat", summary.stability_qat), ("qat_qc", summary.stability_qat_qc), ("qat_bn", summary.stability_qat_bn))
    for label, stability in ((label, s) for label, s in outcomes if s is not None):
        metadata[f"{label}_status"] = stability.status
        metadata[f"{label}_reason"] = stability.reason
        metadata[f"{label}_best"] = stability.best
        metadata[f"{label}_final"] = stability.final
        metadata[f"{label}_final_over_best"] = stability.final_over_best
    return metadata


def png_markdown(path: Path, title: str) -> str:
    """A PNG embedded in Markdown metadata, so the plot shows in the Dagster UI itself."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{encoded})"
