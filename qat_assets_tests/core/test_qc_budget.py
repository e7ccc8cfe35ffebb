"""QC at each profile's default budget undoes a known per-channel gain and offset error (issue 9, section 2).

A yolov10n is trained for a few seconds on small generated images, quantized to W4A16, and then every
conv's pre-BN output gets a known per-channel error h -> g * h + o (folded into the BN, as QC itself
folds). QC, run with the profile's default epochs, lr and batch, must win back at least half of the task
loss that the error cost, measured on the calibration batches (mAP is degenerate at this scale).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.torch_utils import init_seeds

from qat_assets.core.qc import (
    QCConfig,
    attach_task_loss,
    build_calibration_loader,
    calibration_loss,
    fold_corrections,
    insert_corrections,
    run_qc,
)
from qat_assets.core.quantize import QuantOptions, quantize_w4a16, quantized_modules
from qat_assets.core.settings import load_settings
from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

IMGSZ = 64


def train_quantized_model(data_yaml: str, steps: int = 80) -> nn.Module:
    """yolov10n trained briefly in float (Adam, BN statistics updating), then quantized to W4A16."""
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    attach_task_loss(model)
    loader = build_calibration_loader(data_yaml, model, QCConfig(batch=8, imgsz=IMGSZ))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss, _ = model.loss({**batch, "img": batch["img"].float() / 255})
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            done += 1
    quantize_w4a16(model, QuantOptions())
    return model.eval()


def inject_pre_bn_error(model: nn.Module, gain_spread: float = 0.3, offset_sigmas: float = 0.3) -> None:
    """h -> g * h + o on every conv followed by a BN, g ~ U(1 - spread, 1 + spread), o ~ N(0, (k * BN std)^2)."""
    names = [name for name, _ in quantized_modules(model) if name.endswith(".conv")]
    insert_corrections(model, names)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            bn = model.get_submodule(name.rpartition(".")[0]).bn
            gain = torch.empty(layer.gamma.shape).uniform_(1 - gain_spread, 1 + gain_spread, generator=generator)
            offset = torch.randn(layer.beta.shape, generator=generator) * offset_sigmas * bn.running_var.sqrt()
            layer.gamma.copy_(gain)
            layer.beta.copy_(offset)
    fold_corrections(model)


@pytest.fixture
def one_thread():
    """A 64 px yolov10n gains little from a second thread, and on a loaded machine oversubscribed threads
    made this test ~30x slower (7 s instead of 0.2 s per training step); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("profile", ["smoke", "embedded"])
def test_qc_at_the_default_budget_recovers_half_of_an_injected_channel_error(tmp_path, profile):
    # Every RNG (Python, NumPy, torch): the loaders' augmentation draws from all three, and tests that ran
    # earlier in the session leave them anywhere.
    init_seeds(0)
    settings = load_settings({"profile": profile}, environ={})
    data_yaml = write_tiny_yolo_set(tmp_path, settings.calibration_images, IMGSZ)
    clean = train_quantized_model(data_yaml)
    config = QCConfig(batch=settings.qc_batch, imgsz=IMGSZ, epochs=settings.qc_epochs, lr=settings.qc_lr,
                      optimizer=settings.qc_optimizer)
    loader = build_calibration_loader(data_yaml, clean, config, shuffle=False)
    attach_task_loss(clean)
    clean_loss = calibration_loss(clean, loader, "cpu")

    damaged = copy.deepcopy(clean)
    inject_pre_bn_error(damaged)
    attach_task_loss(damaged)
    damaged_loss = calibration_loss(damaged, loader, "cpu")
    assert damaged_loss > 1.1 * clean_loss, "the injected error must cost loss, or the test proves nothing"

    _, report = run_qc(damaged, data_yaml, config)
    # QC starts from the damaged model. Its own loader shuffles, and the detection loss depends on which
    # images share a batch, so the two means agree only to about a percent.
    assert report["loss_before"] == pytest.approx(damaged_loss, rel=0.03)
    recovered = (damaged_loss - report["loss_after"]) / (damaged_loss - clean_loss)
    print(f"{profile}: clean {clean_loss:.4f}, damaged {damaged_loss:.4f}, after QC {report['loss_after']:.4f} "
          f"({recovered:.0%} recovered, {report['steps']} steps at lr {config.lr:g})")
    assert recovered >= 0.5
    assert report["steps"] == settings.qc_epochs * -(-settings.calibration_images // settings.qc_batch)
