"""EMA control of the QAT trainer: the baseline's EMA copy is the live model; short runs still average."""

import pytest
import torch
from ultralytics.utils.torch_utils import ModelEMA

from qat_assets.core.models import build_detection_model
from qat_assets.core.quantize import QuantOptions, quantize_w4a16
from qat_assets.core.settings import SettingsError, load_settings
from qat_assets.core.trainer import ema_schedule, linear_decay_then_hold, trainer_overrides


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
    coco = load_settings({"profile": "coco", "pretrain_from_scratch": True})
    per_epoch = -(-coco.train_images // coco.batch)
    paper = ema_schedule(coco.ema_decay, None, coco.qat_epochs * per_epoch, per_epoch)
    assert paper["decay"] == pytest.approx(0.9999) and paper["tau"] == 2000.0
    assert ema_schedule(0.0, None, 96, 8)["decay"] == 0.0
    fixed = ema_schedule(0.99, 50.0, 96, 8)
    assert fixed["tau"] == 50.0 and fixed["configured_decay"] == 0.99


def test_the_lr_decays_linearly_to_lrf_then_holds_it():
    factor = linear_decay_then_hold(epochs=30, lrf=0.1, hold_epochs=10)
    assert factor(0) == 1.0
    assert factor(10) == pytest.approx(1 - 0.5 * 0.9)  # half way through the 20 decay epochs
    assert [factor(x) for x in (20, 25, 29)] == pytest.approx([0.1, 0.1, 0.1])
    # No hold is Ultralytics' own linear schedule.
    ultralytics = lambda x: max(1 - x / 30, 0) * (1.0 - 0.1) + 0.1  # noqa: E731
    plain = linear_decay_then_hold(epochs=30, lrf=0.1, hold_epochs=0)
    assert [plain(x) for x in range(30)] == pytest.approx([ultralytics(x) for x in range(30)])


def test_a_hold_as_long_as_the_run_is_refused_by_name():
    with pytest.raises(SettingsError, match="pretrain_lr_hold_epochs"):
        load_settings({"profile": "smoke", "pretrain_epochs": 3, "pretrain_lr_hold_epochs": 3}, environ={})


def test_no_early_stopping_cuts_a_run_that_peaked_long_ago(tmp_path):
    """The trainer's patience reaches Ultralytics' EarlyStopping as no limit: 500 epochs after the best, still on."""
    from ultralytics.utils.torch_utils import EarlyStopping

    settings = load_settings({"profile": "smoke", "storage": str(tmp_path)}, environ={})
    overrides = trainer_overrides(settings, "yolo10n", tmp_path / "data.yaml", tmp_path, "cpu", 600, 0)
    stopper = EarlyStopping(patience=overrides["patience"])
    stopper(epoch=0, fitness=0.5)
    assert not any(stopper(epoch=epoch, fitness=0.01) for epoch in range(1, 501))
    # the control: Ultralytics' default would have stopped this run at epoch 100
    default = EarlyStopping(patience=100)
    default(epoch=0, fitness=0.5)
    assert any(default(epoch=epoch, fitness=0.01) for epoch in range(1, 501))
