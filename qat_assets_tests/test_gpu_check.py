"""scripts/gpu_check.py: the smoke profile through every real stage, on the CPU here (CUDA hidden)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from qat_assets.core import qc
from qat_assets.core.host_syncs import HostSync, HostSyncCount

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
STAGES = ("dataset", "FP pretraining", "QAT", "QC + fold check", "ONNX export")


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module, for in-process runs (its import sets the worker's environment defaults: undone)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up while it loads
    with mock.patch.dict(os.environ):
        spec.loader.exec_module(module)
    return module


def stage_rows(output: str) -> dict[str, list[str]]:
    """The final table's row of each stage, split into its columns."""
    rows = {}
    for line in output.splitlines():
        for stage in STAGES:
            if line.startswith(stage) and "  " in line:
                rows[stage] = [cell for cell in line.split("  ") if cell.strip()]
    return rows


def test_without_a_gpu_it_says_so_runs_every_stage_on_the_cpu_and_exits_0(tmp_path):
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(work)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "YOLO_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.splitlines()[0].startswith("no CUDA device: running the same stages on the CPU")
    rows = stage_rows(out)
    assert list(rows) == list(STAGES)
    for stage, cells in rows.items():
        status, seconds, memory, utilization = (cell.strip() for cell in cells[1:])
        assert status == "ok" and float(seconds) >= 0, (stage, cells)
        assert memory.endswith("MiB host RSS") and utilization == "no GPU"
    syncs = next(line for line in out.splitlines() if line.startswith("host syncs per QAT optimizer step"))
    assert int(syncs.split(": ")[1].split(" of ours")[0]) <= 1
    assert "fold check: " in out and "parity: raw head outputs" in out
    assert out.rstrip().endswith("PASSED on cpu (no GPU was checked)")
    assert not work.exists()  # deleted without --keep


def test_a_failing_stage_fails_the_check_and_stops_the_stages_after_it(gpu_check, tmp_path, monkeypatch, capsys):
    # A real fold error: QC's corrections are never folded into the model it saves, and the fold check must see it.
    # QC's rejection rule is switched off so the fold is reached whatever the held-out loss does on this CPU.
    monkeypatch.setattr(qc, "fold_corrections", lambda model, corrections=None: model)
    monkeypatch.setattr(qc, "qc_rejection", lambda before, after: None)
    work = tmp_path / "work"
    assert gpu_check.main(["--device", "cpu", "--work", str(work), "--keep"]) == 1
    out = capsys.readouterr().out
    rows = stage_rows(out)
    assert [rows[stage][1].strip() for stage in STAGES] == ["ok", "ok", "ok", "FAILED", "not run"]
    assert "QC + fold check + BN re-estimation: RuntimeError: folded QC model differs" in out
    assert "the fold is wrong" in out.split("FAILED (1):")[1]
    assert (work / "yolo10n" / "qat_checkpoint").is_dir()  # kept with --keep


def test_a_rejected_qc_goes_through_the_qc_stage_and_the_export(gpu_check, tmp_path, monkeypatch, capsys):
    # The stages after QC get the uncorrected model and a report without a fold (QC rejected in the embedded
    # ladder; the stage then read fold keys only a kept QC had, and every such partition failed).
    monkeypatch.setattr(qc, "qc_rejection", lambda before, after: f"QC rejected: loss rose from {before:.4f} to {after:.4f}")
    assert gpu_check.main(["--device", "cpu", "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    rows = stage_rows(out)
    assert [rows[stage][1].strip() for stage in STAGES] == ["ok"] * len(STAGES)
    assert "QC rejected: loss rose from" in out


def test_host_syncs_of_ours_above_one_per_step_are_a_failure_that_names_where(gpu_check):
    def count(*modules):
        return gpu_check.SyncCount(HostSyncCount([HostSync("scalar read", module, 7) for module in modules]))

    ultralytics = ("ultralytics.utils.tal",) * 5
    line, failures = gpu_check.describe_syncs(count("qat_assets.core.divergence", *ultralytics))
    assert "1 of ours (goal <= 1), 5 in Ultralytics'" in line and failures == []
    line, failures = gpu_check.describe_syncs(count("qat_assets.core.divergence", "qat_assets.core.quantize", *ultralytics))
    assert "2 of ours" in line
    assert failures == ["2 host syncs of ours in one QAT step: 1x scalar read at qat_assets.core.divergence:7; "
                        "1x scalar read at qat_assets.core.quantize:7"]


def test_gpu_utilization_is_sampled_with_nvml_while_a_stage_runs_and_named_when_nvml_is_missing(gpu_check, monkeypatch):
    """NVML itself needs a GPU: a stand-in module answers 30 % then 90 % and counts who asked for which device."""
    import threading
    import types

    asked, rates = [], iter([30, 90] + [90] * 1000)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: (_ for _ in ()).throw(RuntimeError("no such GPU")),
        nvmlDeviceGetHandleByIndex=lambda index: asked.append(index) or f"handle {index}",
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=next(rates)),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_check, "SAMPLE_SECONDS", 0.01)
    sampler = gpu_check.UtilizationSampler("cuda:1")
    assert asked == [1]
    with sampler.sampling() as samples:
        threading.Event().wait(0.2)
    count = len(samples)
    threading.Event().wait(0.05)
    assert count >= 2 and len(samples) == count  # sampled during the stage, and not after it
    assert sampler.describe(samples) == f"mean {sum(samples) / count:.0f} %, max 90 % ({count} samples)"
    assert samples[0] == 30

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    missing = gpu_check.UtilizationSampler("cuda:0")
    with missing.sampling() as samples:
        pass
    assert missing.describe(samples) == "not sampled: pip install nvidia-ml-py"
    assert gpu_check.UtilizationSampler("cpu").describe([]) == "no GPU"
