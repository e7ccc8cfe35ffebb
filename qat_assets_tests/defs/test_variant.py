"""The real heavy stages through Dagster and dagster-pipes workers, at the smoke profile (seconds each)."""

import os
import re
import signal
import threading
import time
from pathlib import Path

import torch

from qat_assets.core import layout
from qat_assets.core.artifacts import sha256_file
from qat_assets.core.summary import RunSummary
from qat_assets.core.code_versions import source_code_version
from qat_assets_tests.dagster_harness import data_version, key, latest_metadata, run_assets, step_failure_messages


def test_one_partition_goes_from_data_to_verdict(storage, instance):
    assert run_assets(instance, ["coco_subset", "calibration_subset", "yolo10n/pretrained_checkpoint"]).success
    pretrained = latest_metadata(instance, "yolo10n/pretrained_checkpoint")
    assert pretrained["source"] == "trained-here" and "mAP50-95(B)" in pretrained
    assert pretrained["sha256"] == sha256_file(layout.pretrained_dir(storage, "yolo10n") / "pretrained.pt")

    result = run_assets(
        instance, ["yolo10n/qat_checkpoint", "yolo10n/qc_checkpoint", "yolo10n/stability_verdict"], "ema|0"
    )
    assert result.success, step_failure_messages(result)

    qat = latest_metadata(instance, "yolo10n/qat_checkpoint", "ema|0")
    assert qat["status"] == "2/2 epochs" and qat["partition"] == "ema|0"
    assert [row.data["epoch"] for row in qat["history"].records] == [0, 1, 2]  # epoch 0 is the PTQ model
    assert qat["quantization_counts"]["float"] == 1  # the DFL conv
    # The collapse diagnostics: model-level per trained epoch, the layers and BatchNorms of the last one.
    assert [row.data["epoch"] for row in qat["diagnostics"].records] == [1, 2]
    assert qat["diagnostics_layers_last_epoch"].records and qat["diagnostics_bn_last_epoch"].records
    state = torch.load(qat["checkpoint"], weights_only=True)
    assert set(state) == {"model", "ema"}

    qc = latest_metadata(instance, "yolo10n/qc_checkpoint", "ema|0")
    assert qc["max_fold_rel_diff"] < 1e-4
    folded = torch.load(qc["checkpoint"], weights_only=True)["model"]
    assert not any("gamma" in name or "beta" in name for name in folded)  # no QC modules left

    summary = RunSummary.read(layout.run_dir(storage, "yolo10n", "stability_verdict", "ema", 0) / "run_summary.json")
    assert summary.planned_epochs == 2 and len(summary.history) == 3
    assert summary.history[0].diagnostics is None and summary.history[-1].diagnostics.layers
    assert summary.qc is not None and summary.qc.map50_95_before == qc["map50_95_before"]
    settings = summary.training
    assert summary.qc.steps == qc["qc_steps"] == settings["qc_epochs"] * -(-settings["calibration_images"] // settings["qc_batch"])
    assert summary.qc.lr == qc["qc_lr"] and summary.qc.calibration_images == settings["calibration_images"]
    assert summary.qc.layers and summary.qc.max_abs_gamma_minus_1 == max(l.max_abs_gamma_minus_1 for l in summary.qc.layers)
    # BN re-estimation ran from the same QAT weights: same starting mAP, its own outcome and verdict.
    assert summary.bn is not None and summary.bn.map50_95_before == summary.qc.map50_95_before
    assert (summary.bn.batches, summary.bn.images) == (2, 16) and summary.stability_qat_bn is not None  # smoke: one pass
    verdict = latest_metadata(instance, "yolo10n/stability_verdict", "ema|0")
    assert verdict["qat_status"] in {"completed-success", "completed-failed"}

    # Every materialization carries its artifact's sha256 as data version, and the heavy steps a code version.
    assert data_version(instance, "yolo10n/pretrained_checkpoint") == pretrained["sha256"]
    assert data_version(instance, "yolo10n/qat_checkpoint", "ema|0") == sha256_file(Path(qat["checkpoint"]))
    assert data_version(instance, "yolo10n/qc_checkpoint", "ema|0") == sha256_file(Path(qc["checkpoint"]))
    assert data_version(instance, "yolo10n/stability_verdict", "ema|0") == sha256_file(verdict["run_summary"])
    subset = latest_metadata(instance, "coco_subset")
    assert data_version(instance, "coco_subset") == subset["fingerprint"]
    assert data_version(instance, "calibration_subset") == latest_metadata(instance, "calibration_subset")["fingerprint"]
    code_versions = instance.get_latest_materialization_code_versions([key("yolo10n/qat_checkpoint")])
    assert code_versions[key("yolo10n/qat_checkpoint")] == source_code_version("qat")

    # Each epoch's progress reached the run's log from the worker, as it happened.
    messages = [record.event_log_entry.user_message for record in instance.get_records_for_run(result.run_id).records]
    assert any("yolo10n ema|0 epoch 1: mAP50-95" in m for m in messages)
    assert any("after QC mAP50-95" in m for m in messages)
    assert any("after BN re-estimation mAP50-95" in m for m in messages)
    # No warm worker server serves this storage: every worker started cold.
    assert any("qat: starting worker (cold: no warm worker server runs)" in m for m in messages)


def kill_worker_when_it_logs(log_file: Path, text: str, timeout: float = 300.0) -> threading.Thread:
    """SIGKILL the worker process whose log gets `text` (as the OOM killer would).

    The worker names its pid in its first log line: a cold worker is the launched process, a warm one a
    child forked by the warm server (the launched client only stands in for it).
    """

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            log = log_file.read_text(errors="replace") if log_file.is_file() else ""
            if text in log:
                os.kill(int(re.search(r"worker on \S+ \(pid (\d+)\)", log).group(1)), signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def failure_of_a_killed_qat_worker(storage, instance) -> str:
    """Run yolo10n's QAT (baseline|1), SIGKILL its worker once training has started; the step's failure message."""
    log_file = layout.run_dir(storage, "yolo10n", "qat_checkpoint", "baseline", 1) / "qat_worker.log"
    watcher = kill_worker_when_it_logs(log_file, "fresh start")
    result = run_assets(instance, ["yolo10n/qat_checkpoint"], "baseline|1")
    watcher.join(timeout=5)
    assert not result.success
    (message,) = step_failure_messages(result)
    return message


def test_a_killed_worker_fails_its_step_with_exit_status_and_log_tail(storage, instance):
    assert run_assets(instance, ["coco_subset", "calibration_subset", "yolo10n/pretrained_checkpoint"]).success
    message = failure_of_a_killed_qat_worker(storage, instance)
    assert "the qat worker died" in message and "code -9" in message
    assert "fresh start" in message  # the last lines of its log
