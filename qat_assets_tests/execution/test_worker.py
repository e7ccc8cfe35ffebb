"""The worker process itself, run the way the launcher runs it (standalone mode, no Dagster needed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qat_assets.core.artifacts import load_checkpoint, read_sidecar, save_checkpoint
from qat_assets.core.coco import convert_coco_subset
from qat_assets.core.pretrain import run_pretrain
from qat_assets.core.requests import PretrainRequest, QATRequest
from qat_assets.core.settings import load_settings
from qat_assets.core.synthetic import write_synthetic_coco
from qat_assets.core.trainer import HISTORY_FILE, STATE_FILE


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A smoke dataset and a 1-epoch FP yolo10n, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("worker")
    settings = load_settings({"profile": "smoke", "storage": str(root)})
    write_synthetic_coco(root / "coco", train_images=16, val_images=8, image_size=64, seed=0)
    subset = convert_coco_subset(root / "coco", root / "subset", train_images=16, val_images=8, seed=0, skip_bad_items=False)
    result = run_pretrain(
        PretrainRequest(variant="yolo10n", dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
                        names=subset.class_names, train_images=16, out_dir=root / "pretrained", settings=settings),
        log=lambda message: None,
    )
    return root, subset, result


def qat_request(pretrained, out_dir: Path, **overrides) -> Path:
    root, subset, result = pretrained
    settings = load_settings({"profile": "smoke", "storage": str(root), **overrides})
    request = QATRequest(
        variant="yolo10n", method="ema", seed=0, pretrained_checkpoint=result["checkpoint"],
        pretrained_sha256=result["sha256"], dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
        train_images=16, out_dir=out_dir, trajectory_dir=trajectory_dir(out_dir), settings=settings,
    )
    path = out_dir.parent / f"{out_dir.name}.request.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(request.model_dump_json())
    return path


def trajectory_dir(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}-trajectory"


def start_worker(request: Path, out_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qat_assets.execution.worker", "qat", "--request", str(request), "--log-file",
         str(out_dir / "qat_worker.log"), "--result", str(out_dir / "result.json")],
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )


def completed_epochs(out_dir: Path) -> int:
    state = trajectory_dir(out_dir) / STATE_FILE
    if not state.is_file():
        return 0
    import torch

    try:
        return int(torch.load(state, weights_only=True)["epoch"])
    except Exception:  # caught mid-rename
        return 0


def test_identical_pretraining_runs_give_identical_weights_and_record_plateau_and_ema(pretrained):
    root, subset, first = pretrained
    settings = load_settings({"profile": "smoke", "storage": str(root)})
    second = run_pretrain(
        PretrainRequest(variant="yolo10n", dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
                        names=subset.class_names, train_images=16, out_dir=root / "pretrained_again", settings=settings),
        log=lambda message: None,
    )
    weights = [load_checkpoint(Path(r["checkpoint"]))["model"] for r in (first, second)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert second["metrics"] == first["metrics"]
    # the EMA ramp comes from ema_schedule (tau scaled to the run length), not a fixed 2000
    assert second["ema"]["tau"] < 2000 and second["ema"]["configured_tau"] is None
    assert second["plateau"]["at_plateau"] is None  # one epoch cannot show a plateau of 10


def test_a_killed_worker_resumes_from_its_last_epoch_without_counting_one_twice(pretrained, tmp_path):
    out_dir = tmp_path / "qat"
    request = qat_request(pretrained, out_dir, qat_epochs=4)
    worker = start_worker(request, out_dir)
    deadline = time.time() + 300
    while completed_epochs(out_dir) < 1 and worker.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert worker.poll() is None, "the worker finished before it could be killed; the test needs more epochs"
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    done_before_kill = completed_epochs(out_dir)
    assert 1 <= done_before_kill < 4

    rerun = start_worker(request, out_dir)
    assert rerun.wait(timeout=600) == 0
    result = json.loads((out_dir / "result.json").read_text())
    assert result["resume"].startswith("resumed after epoch")
    assert int(result["resume"].split("epoch ")[1].split(" ")[0]) >= done_before_kill
    epochs = [h["epoch"] for h in result["history"]]
    assert epochs == [0, 1, 2, 3, 4]  # PTQ, then every epoch exactly once
    assert [h["epoch"] for h in json.loads((trajectory_dir(out_dir) / HISTORY_FILE).read_text())] == epochs


def test_a_nan_loss_is_reported_as_diverged_in_one_line(pretrained, tmp_path):
    # A NaN in one BN scale of the starting point makes the very first training loss NaN.
    root, subset, result = pretrained
    state = load_checkpoint(Path(result["checkpoint"]))["model"]
    state[next(k for k in state if k.endswith("bn.weight"))][0] = float("nan")
    sidecar = {k: v for k, v in read_sidecar(Path(result["checkpoint"])).items() if k not in ("sha256", "file")}
    poisoned = tmp_path / "poisoned" / "pretrained.pt"
    digest = save_checkpoint(poisoned, {"model": state}, sidecar)
    out_dir = tmp_path / "qat"
    request = qat_request((root, subset, {"checkpoint": str(poisoned), "sha256": digest}), out_dir, qat_epochs=2)
    assert start_worker(request, out_dir).wait(timeout=600) == 0
    outcome = json.loads((out_dir / "result.json").read_text())
    assert outcome["diverged_at_epoch"] == 1
    assert outcome["completed_epochs"] == 0
    diverged_lines = [line for line in (out_dir / "qat_worker.log").read_text().splitlines() if "DIVERGED" in line]
    assert len(diverged_lines) == 1 and "NaN/Inf in epoch 1" in diverged_lines[0]
    assert (out_dir / "qat_checkpoint.pt").is_file()  # what it had is kept


def test_an_expected_failure_is_one_error_message_not_a_crash(pretrained, tmp_path):
    out_dir = tmp_path / "qat"
    request = qat_request(pretrained, out_dir)
    payload = json.loads(request.read_text())
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(Path(payload["pretrained_checkpoint"]).read_bytes()[:1000])
    (tmp_path / "damaged.json").write_text(Path(payload["pretrained_checkpoint"]).with_suffix(".json").read_text())
    payload["pretrained_checkpoint"] = str(damaged)
    request.write_text(json.dumps(payload))
    assert start_worker(request, out_dir).wait(timeout=300) == 2
    result = json.loads((out_dir / "result.json").read_text())
    assert result["error_type"] == "ArtifactError" and "damaged.pt" in result["error"]


def test_inputs_this_machine_cannot_see_are_one_error_naming_the_shared_storage(pretrained, tmp_path):
    # What a Ray node without the shared QAT_STORAGE mount sees: the path exists only on the submitting machine.
    out_dir = tmp_path / "qat"
    request = qat_request(pretrained, out_dir)
    payload = json.loads(request.read_text())
    payload["pretrained_checkpoint"] = "/mnt/only-on-the-head/pretrained.pt"
    request.write_text(json.dumps(payload))
    assert start_worker(request, out_dir).wait(timeout=300) == 2
    result = json.loads((out_dir / "result.json").read_text())
    assert result["error_type"] == "InputsNotVisible"
    assert "pretrained_checkpoint=/mnt/only-on-the-head/pretrained.pt" in result["error"]
    assert "QAT_STORAGE must be a path every node mounts" in result["error"]


def test_qat_worker_threads_outlast_ultralytics_device_selection():
    # Ultralytics' select_device resets torch to cores - 1 threads on the CPU; torch's own default is all
    # cores. 3 is neither on this 2-core machine, so only the worker's setting can give it.
    code = (
        "from qat_assets.execution.worker import use_worker_threads; use_worker_threads(); "
        "import torch; from ultralytics.utils.torch_utils import select_device; select_device('cpu'); "
        "print(torch.get_num_threads())"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "QAT_WORKER_THREADS": "3"}, capture_output=True, text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[-1] == "3"


def test_a_bad_thread_count_is_an_error_naming_it(monkeypatch):
    from qat_assets.execution.worker import use_worker_threads

    monkeypatch.setenv("QAT_WORKER_THREADS", "0")
    with pytest.raises(ValueError, match="QAT_WORKER_THREADS='0' must be a whole number of threads, at least 1"):
        use_worker_threads()
