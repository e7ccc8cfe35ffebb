import json
import math
from datetime import datetime, timedelta, timezone

import pytest

from qat_assets.core.artifacts import ArtifactError
from qat_assets.core.stability import classify_qat, classify_with_bn, classify_with_qc
from qat_assets.core.summary import BNResult, EpochRecord, QCResult, RunSummary, WithinSeed

_T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def history(maps, start=0):
    """Epoch `start`.. with the given mAP50-95 values (epoch 0 = PTQ)."""
    return [
        EpochRecord(epoch=start + i, map50_95=m, map50=min(1.0, 1.5 * m), precision=0.5, recall=0.5, box_loss=1.0)
        for i, m in enumerate(maps)
    ]


def make_summary(
    variant="yolo10n",
    method="ema",
    seed=0,
    maps=(0.20, 0.30, 0.32, 0.31),
    planned_epochs=None,
    qc_after=0.33,
    error=None,
    diverged_at_epoch=None,
    dataset_fp="data-1",
    profile_fp="prof-1",
    evaluation=None,
    created_minutes=0,
    bn_after=None,
    within_seed=None,
) -> RunSummary:
    """A run summary whose verdicts come from the real classifiers (maps[0] is the PTQ epoch)."""
    records = history(maps)
    planned = planned_epochs if planned_epochs is not None else len(maps) - 1
    qat = classify_qat(records, planned, diverged_at_epoch=diverged_at_epoch, error=error)
    qc = None
    if qc_after is not None and qat.status != "incomplete":  # QC runs only on finished QAT runs
        qc = QCResult(map50_95_before=qat.final, map50_95_after=qc_after, map50_before=0.5, map50_after=0.5,
                      delta=qc_after - qat.final, max_fold_rel_diff=1e-6, seconds=1.0)
    bn = None
    if bn_after is not None and qat.status != "incomplete":
        bn = BNResult(map50_95_before=qat.final, map50_95_after=bn_after, map50_before=0.5, map50_after=0.5,
                      delta=bn_after - qat.final, batches=8, images=256, seconds=1.0)
    return RunSummary(
        variant=variant, method=method, seed=seed, partition_key=f"{method}|{seed}",
        model={"name": variant}, quantization={"weight_bit_width": 4},
        dataset={"fingerprint": dataset_fp}, training={"profile_fingerprint": profile_fp, "qat_epochs": planned},
        evaluation=evaluation or {"imgsz": 64, "conf": 0.001, "iou": 0.7, "split": "val", "batch": 8},
        planned_epochs=planned, history=records, diverged_at_epoch=diverged_at_epoch, error=error,
        ptq_map50_95=maps[0] if maps else None, qc=qc,
        stability_qat=qat, stability_qat_qc=classify_with_qc(qat, qc), bn=bn,
        stability_qat_bn=classify_with_bn(qat, bn) if bn_after is not None else None,
        code_version="abc123", package_versions={"torch": "2.14.1"},
        created_at=_T0 + timedelta(minutes=created_minutes), within_seed=within_seed,
    )


def within_seed(difference, ci_low, ci_high, epoch=3, seed=0):
    """A recorded within-seed bootstrap of EMA - live (core/within_seed.py)."""
    return WithinSeed(epoch=epoch, ema_map50_95=0.30 + difference, live_map50_95=0.30, difference=difference,
                      std=(ci_high - ci_low) / 3.92, ci_low=ci_low, ci_high=ci_high, unpaired_std=0.02, images=64,
                      resamples=1000, seed=seed, source="last epoch's validation")


def test_summary_round_trips_through_json(tmp_path):
    summary = make_summary(maps=(0.1, 0.2, 0.25), planned_epochs=3, within_seed=within_seed(0.004, -0.002, 0.011))
    path = summary.write(tmp_path / "run" / "run_summary.json")
    again = RunSummary.read(path)
    assert again == summary and again.within_seed.ci_high == 0.011
    assert again.stability_qat.status == "incomplete"
    assert [p.name for p in path.parent.iterdir()] == ["run_summary.json"]  # no temp file left behind


def test_a_diverged_metric_survives_the_round_trip(tmp_path):
    # NaN is what a diverged epoch really measured; it must come back as NaN, not as 0 or null.
    summary = make_summary(maps=(0.1, 0.2, float("nan")), planned_epochs=2)
    again = RunSummary.read(summary.write(tmp_path / "run_summary.json"))
    assert math.isnan(again.history[-1].map50_95)
    assert again.stability_qat == summary.stability_qat.model_copy(update={"final": again.stability_qat.final})


def test_unsupported_schema_version_names_the_file(tmp_path):
    path = make_summary().write(tmp_path / "run_summary.json")
    payload = json.loads(path.read_text())
    payload["schema_version"] = 2
    path.write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match=r"run_summary\.json has schema_version 2"):
        RunSummary.read(path)


def test_missing_and_invalid_summaries_raise_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        RunSummary.read(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ArtifactError, match="broken.json is not valid JSON"):
        RunSummary.read(broken)
    payload = make_summary().model_dump(mode="json")
    del payload["history"]
    (tmp_path / "short.json").write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="short.json does not match schema version 1"):
        RunSummary.read(tmp_path / "short.json")


def test_summary_requires_the_fingerprints_comparability_rests_on():
    payload = make_summary().model_dump()
    payload["dataset"] = {"name": "coco"}
    with pytest.raises(ValueError, match="fingerprint"):
        RunSummary.model_validate(payload)
