"""The stability verdict of one run: its `run_summary.json`, classified with and without QC."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .settings import Settings
from .stability import classify_qat, classify_with_bn, classify_with_qc
from .summary import BNResult, EpochRecord, QCResult, RunSummary

TRACKED_PACKAGES = ("qat_assets", "torch", "torchvision", "ultralytics", "brevitas", "dagster", "numpy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_version() -> str:
    """The git commit of this checkout (with `+dirty` for local changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"qat_assets {package_versions()['qat_assets']}"


def qc_result(qc_sidecar: dict[str, Any] | None, qat_sha256: str) -> tuple[QCResult | None, str | None]:
    """The QC outcome and, when QC did not produce one for this very QAT checkpoint, why."""
    if qc_sidecar is None:
        return None, "qc_checkpoint is not materialized for this partition"
    if qc_sidecar.get("qat_sha256") != qat_sha256:
        return None, "qc_checkpoint was made from an earlier QAT checkpoint; re-materialize qc_checkpoint"
    if qc_sidecar.get("skipped"):
        return None, f"QC skipped: {qc_sidecar['skipped']}"
    # The budget lives under qc_settings, the movement per layer under layer_stats.
    layers = [{k: row[k] for k in ("name", "max_abs_gamma_minus_1", "max_abs_beta")}
              for row in qc_sidecar.get("layer_stats", []) if "max_abs_beta" in row]
    flat = {**qc_sidecar.get("qc_settings", {}), **qc_sidecar, "layers": layers}
    if layers:
        flat["max_abs_gamma_minus_1"] = max(row["max_abs_gamma_minus_1"] for row in layers)
        flat["max_abs_beta"] = max(row["max_abs_beta"] for row in layers)
    return QCResult(**{k: flat[k] for k in QCResult.model_fields if k in flat}), None


def bn_result(qc_sidecar: dict[str, Any] | None, qat_sha256: str) -> tuple[BNResult | None, str | None]:
    """The BN re-estimation outcome, computed in the QC stage from the same QAT checkpoint, or why there is none."""
    qc, problem = qc_result(qc_sidecar, qat_sha256)
    if problem is not None:
        return None, problem.replace("QC skipped", "BN re-estimation skipped")
    if "bn_reestimation" not in qc_sidecar:
        return None, "qc_checkpoint predates BN re-estimation; re-materialize qc_checkpoint"
    return BNResult(**qc_sidecar["bn_reestimation"]), None


def build_run_summary(
    qat_sidecar: dict[str, Any], qc_sidecar: dict[str, Any] | None, *, partition_key: str, settings: Settings,
    dataset: dict[str, Any],
) -> RunSummary:
    history = [EpochRecord(**{k: v for k, v in h.items() if k in EpochRecord.model_fields}) for h in qat_sidecar["history"]]
    stability_qat = classify_qat(
        history, qat_sidecar["planned_epochs"], diverged_at_epoch=qat_sidecar.get("diverged_at_epoch"),
        collapse_ratio=settings.collapse_ratio, degenerate_map=settings.degenerate_map,
        window=settings.stability_window,
    )
    qc, qc_problem = qc_result(qc_sidecar, qat_sidecar["sha256"])
    stability_qc = classify_with_qc(
        stability_qat, qc, qc_error=qc_problem, collapse_ratio=settings.collapse_ratio,
        degenerate_map=settings.degenerate_map,
    )
    bn, bn_problem = bn_result(qc_sidecar, qat_sidecar["sha256"])
    stability_bn = classify_with_bn(
        stability_qat, bn, bn_error=bn_problem, collapse_ratio=settings.collapse_ratio,
        degenerate_map=settings.degenerate_map,
    )
    return RunSummary(
        variant=qat_sidecar["variant"],
        method=qat_sidecar["method"],
        seed=qat_sidecar["seed"],
        partition_key=partition_key,
        model={"variant": qat_sidecar["variant"], "classes": qat_sidecar["names"], "fp_map50_95": qat_sidecar["fp_map50_95"],
               "pretrained_sha256": qat_sidecar["pretrained_sha256"]},
        quantization={"options": qat_sidecar["quantization"]["options"], "counts": qat_sidecar["quantization_counts"]},
        dataset=dataset,
        training={**qat_sidecar["settings"], "ema": qat_sidecar["ema"], "profile_fingerprint": qat_sidecar["profile_fingerprint"],
                  "resume": qat_sidecar["resume"], "device": qat_sidecar["device"],
                  # the batch it trained at, when Ultralytics halved the configured one after an OOM
                  "batch_used": qat_sidecar.get("training_batch", {}).get("used", [qat_sidecar["settings"]["batch"]]),
                  # the precision `amp` resolved to on its device (sidecars from before AMP trained in fp32)
                  "precision": qat_sidecar.get("training_precision") or "off"},
        evaluation=qat_sidecar["evaluation"],
        planned_epochs=qat_sidecar["planned_epochs"],
        history=history,
        diverged_at_epoch=qat_sidecar.get("diverged_at_epoch"),
        error=None,
        ptq_map50_95=qat_sidecar["ptq_map50_95"],
        qc=qc,
        bn=bn,
        stability_qat=stability_qat,
        stability_qat_qc=stability_qc,
        stability_qat_bn=stability_bn,
        within_seed=qat_sidecar.get("within_seed"),  # absent from sidecars written before it existed
        code_version=code_version(),
        package_versions=package_versions(),
        created_at=datetime.now(timezone.utc),
    )

