"""QC never makes the model worse (issue 26, section 4): when the check loss rises, the uncorrected model is kept."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.calibration import select_heldout_set
from qat_assets.core.plots import qc_markdown
from qat_assets.core.qc import QCConfig, build_calibration_loader, corrected_layers, qc_rejection, run_qc
from qat_assets.core.quantize import QuantOptions, quantize_w4a16
from qat_assets.core.verdict import qc_result
from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

IMGSZ = 64


@pytest.fixture(scope="module")
def calibration_yaml(tmp_path_factory) -> str:
    return write_tiny_yolo_set(tmp_path_factory.mktemp("calib"), 6, IMGSZ)


@pytest.fixture
def quantized_model(calibration_yaml) -> nn.Module:
    """Random-init W4A16 yolov10n whose BNs hold float statistics of the calibration images."""
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    batch = next(iter(build_calibration_loader(calibration_yaml, model, QCConfig(batch=6, imgsz=IMGSZ))))
    model.train()
    with torch.no_grad():
        model(batch["img"].float() / 255)
    quantize_w4a16(model, QuantOptions())
    return model.eval()


def test_qc_rejection_names_both_losses_and_only_fires_when_the_loss_rose():
    assert qc_rejection(1.0, 1.25) == "QC rejected: loss rose from 1.0000 to 1.2500"
    assert qc_rejection(1.25, 1.0) is None
    assert qc_rejection(1.0, 1.0) is None


def test_qc_that_raises_the_loss_is_rejected_and_the_uncorrected_weights_are_kept(quantized_model, calibration_yaml):
    # Adam's first steps move every one of the ~10k gammas and betas by about lr: at lr 0.5 each channel's gain
    # is off by up to 50 % after one step, far past any minimum, so the loss rises on any kernel family.
    uncorrected = copy.deepcopy(quantized_model.state_dict())
    config = QCConfig(batch=2, imgsz=IMGSZ, epochs=1, lr=0.5, optimizer="Adam")
    model, report = run_qc(quantized_model, calibration_yaml, config)
    print(report["rejected"])
    assert report["check_loss_after"] > report["check_loss_before"]
    assert report["rejected"] == qc_rejection(report["check_loss_before"], report["check_loss_after"])
    assert report["rejected"].startswith("QC rejected: loss rose from")
    assert report["check_set"] == "calibration" and report["check_images"] == 6
    assert model is quantized_model and not corrected_layers(model)
    state = model.state_dict()
    assert state.keys() == uncorrected.keys()
    assert all(torch.equal(state[key], value) for key, value in uncorrected.items())
    # QC did move (so the rejection is what kept the weights, not a QC that could not move).
    assert max(row["max_abs_gamma_minus_1"] for row in report["corrections"]) > 0.1


def test_qc_that_lowers_the_held_out_loss_is_kept_and_folded(quantized_model, calibration_yaml, tmp_path):
    heldout = write_tiny_yolo_set(tmp_path / "heldout", 4, IMGSZ)
    before = copy.deepcopy(quantized_model.state_dict())
    # The paper's Adam 1e-4 for 3 steps moves every gamma and beta by at most ~3e-4, along its gradient's sign.
    config = QCConfig(batch=2, imgsz=IMGSZ, epochs=1, lr=1e-4, optimizer="Adam")
    model, report = run_qc(quantized_model, calibration_yaml, config, check_yaml=heldout)
    assert report["check_set"] == "held-out" and report["check_images"] == 4
    assert report["rejected"] is None and report["check_loss_after"] <= report["check_loss_before"]
    state = model.state_dict()
    assert any(not torch.equal(state[key], value) for key, value in before.items())


def test_heldout_set_holds_training_images_outside_the_calibration_set(tmp_path):
    subset_root = tmp_path / "subset"
    data = yaml.safe_load(open(write_tiny_yolo_set(subset_root, 10, IMGSZ)))
    # A training split that is a folder of images, labels beside it (the subset's layout); D_c lists 4 of them.
    (subset_root / "dataset.yaml").write_text(yaml.safe_dump({**data, "train": "images", "val": "images"}))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "images.txt").write_text("".join(f"/anywhere/{i}.png\n" for i in (0, 1, 2, 5)))
    (calibration / "dataset.yaml").write_text(yaml.safe_dump({"path": str(calibration), "train": "images.txt"}))

    heldout_yaml = select_heldout_set(subset_root / "dataset.yaml", calibration / "dataset.yaml",
                                      tmp_path / "heldout", size=3)
    heldout = yaml.safe_load(heldout_yaml.read_text())
    images = sorted(p.name for p in (tmp_path / "heldout" / heldout["train"]).iterdir())
    assert images == ["3.png", "4.png", "6.png"]
    labels = sorted(p.name for p in (tmp_path / "heldout" / "labels" / "heldout").iterdir())
    assert labels == ["3.txt", "4.txt", "6.txt"]
    assert (tmp_path / "heldout" / "labels" / "heldout" / "3.txt").read_text() == (
        subset_root / "labels" / "3.txt").read_text()
    # D_c holding every training image leaves nothing to hold out.
    (calibration / "images.txt").write_text("".join(f"/anywhere/{i}.png\n" for i in range(10)))
    assert select_heldout_set(subset_root / "dataset.yaml", calibration / "dataset.yaml",
                              tmp_path / "none", size=3) is None


def test_a_rejected_qc_shows_in_the_qc_result_and_the_summary():
    sidecar = {
        "qat_sha256": "abc", "map50_95_before": 0.3, "map50_95_after": 0.3, "map50_before": 0.5, "map50_after": 0.5,
        "delta": 0.0, "max_fold_rel_diff": 0.0, "seconds": 12.0,
        "qc_settings": {"steps": 8, "epochs": 1, "optimizer": "SGD", "lr": 3e-3, "batch": 8,
                        "check_set": "held-out", "check_loss_before": 1.0, "check_loss_after": 1.5,
                        "rejected": "QC rejected: loss rose from 1.0000 to 1.5000"},
    }
    qc, problem = qc_result(sidecar, "abc")
    assert problem is None and qc.rejected == "QC rejected: loss rose from 1.0000 to 1.5000"
    assert qc.check_loss_before == 1.0 and qc.check_loss_after == 1.5 and qc.check_set == "held-out"

    class Run:  # what qc_markdown reads of a run summary
        variant, method, seed, partition_key = "yolo10n", "ema", 0, "ema|0"

    Run.qc = qc
    assert any("QC rejected: loss rose from 1.0000 to 1.5000 (held-out images), uncorrected model kept" in line
               for line in qc_markdown([Run]))
