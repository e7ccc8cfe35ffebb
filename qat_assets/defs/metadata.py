"""Worker results and summaries turned into Dagster metadata: numbers, tables and paths a person reads."""

import base64
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dagster import Failure, MetadataValue, TableColumn, TableRecord, TableSchema

from qat_assets.core.artifacts import ArtifactError
from qat_assets.core.coco import DatasetError
from qat_assets.core.settings import SettingsError
from qat_assets.core.summary import RunSummary

HISTORY_COLUMNS = (
    ("epoch", "int"), ("map50_95", "float"), ("map50", "float"), ("precision", "float"), ("recall", "float"),
    ("box_loss", "float"), ("cls_loss", "float"), ("dfl_loss", "float"), ("lr", "float"),
    ("oscillating_fraction", "float"), ("seconds", "float"),
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
        "settings": MetadataValue.json(result["settings"]),
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
        "ema": MetadataValue.json(result.get("ema") or {}),
    }


def qat_metadata(result: dict[str, Any]) -> dict[str, Any]:
    trained = [h for h in result["history"] if h["epoch"] > 0]
    best = max(trained, key=lambda h: h["map50_95"], default=None)
    final = trained[-1] if trained else None
    epoch_seconds = [h["seconds"] for h in trained if h.get("seconds") is not None]
    return {
        **checkpoint_metadata(result),
        "partition": f"{result['method']}|{result['seed']}",
        "status": f"diverged at epoch {result['diverged_at_epoch']}" if result["diverged_at_epoch"] else
        f"{result['completed_epochs']}/{result['planned_epochs']} epochs",
        "resume": result["resume"],
        "ptq_map50_95": result["ptq_map50_95"],
        "fp_map50_95": result["fp_map50_95"],
        "best_map50_95": best["map50_95"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_map50_95": final["map50_95"] if final else None,
        "final_epoch": final["epoch"] if final else None,
        "mean_epoch_wall_time_s": round(sum(epoch_seconds) / len(epoch_seconds), 1) if epoch_seconds else None,
        "ema": MetadataValue.json(result["ema"]),
        "history": history_table(result["history"]),
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
        "corrections": table(
            result["layer_stats"], (("name", "string"), ("mean_abs_gamma_minus_1", "float"), ("mean_abs_beta", "float"))
        ),
    }


def verdict_metadata(summary: RunSummary, path: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = {"run_summary": MetadataValue.path(str(path))}
    for label, stability in (("qat", summary.stability_qat), ("qat_qc", summary.stability_qat_qc)):
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
