"""EMA control of the QAT trainer: the baseline's EMA copy is the live model; short runs still average."""

import pytest
import torch
from ultralytics.utils.torch_utils import ModelEMA

from qat_assets.core.models import build_detection_model
from qat_assets.core.quantize import QuantOptions, quantize_w4a16
from qat_assets.core.settings import load_settings
from qat_assets.core.trainer import ema_schedule


def test_decay_zero_makes_the_ema_copy_equal_the_model_after_every_update():
    torch.manual_seed(0)
    model = build_detection_model("yolo10n", ["a", "b", "c"])
    quantize_w4a16(model, QuantOptions())
    schedule = ema_schedule(0.0, None, total_updates=100, updates_per_epoch=10)
    ema = ModelEMA(model, decay=schedule["decay"], tau=schedule["tau"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        optimizer.step()
        ema.update(model)
        live, averaged = model.state_dict(), ema.ema.state_dict()
        assert all(torch.equal(live[k], averaged[k]) for k in live if live[k].dtype.is_floating_point)


def test_a_real_decay_averages_instead_of_copying():
    model = build_detection_model("yolo10n", ["a"])
    schedule = ema_schedule(0.9999, None, total_updates=1000, updates_per_epoch=100)
    ema = ModelEMA(model, decay=schedule["decay"], tau=schedule["tau"])
    for _ in range(20):
        for p in model.parameters():
            p.data.add_(1.0)
        ema.update(model)
    weight = "model.0.conv.weight"
    assert not torch.equal(model.state_dict()[weight], ema.ema.state_dict()[weight])


def test_the_ema_schedule_scales_with_run_length_and_gives_back_the_paper_at_coco_scale():
    embedded = load_settings({"profile": "embedded"})
    per_epoch = -(-embedded.train_images // embedded.batch)
    short = ema_schedule(embedded.ema_decay, None, embedded.qat_epochs * per_epoch, per_epoch)
    assert short["decay"] == pytest.approx(1 - 1 / per_epoch)  # a 32-step run still averages over an epoch
    coco = load_settings({"profile": "coco"})
    per_epoch = -(-coco.train_images // coco.batch)
    paper = ema_schedule(coco.ema_decay, None, coco.qat_epochs * per_epoch, per_epoch)
    assert paper["decay"] == pytest.approx(0.9999) and paper["tau"] == 2000.0
    assert ema_schedule(0.0, None, 96, 8)["decay"] == 0.0
    fixed = ema_schedule(0.99, 50.0, 96, 8)
    assert fixed["tau"] == 50.0 and fixed["configured_decay"] == 0.99
