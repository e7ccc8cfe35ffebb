"""EMA control of the QAT trainer: the baseline's EMA copy is the live model; short runs still average."""

import pytest
import torch
from ultralytics.utils.torch_utils import ModelEMA

from qat_assets.core.models import build_detection_model
from qat_assets.core.quantize import QuantOptions, quantize_w4a16
from qat_assets.core import trainer as trainer_module
from qat_assets.core.evaluate import evaluation_settings, validator_arguments
from qat_assets.core.settings import PRETRAIN_FIELDS, QAT_FIELDS, SettingsError, load_settings
from qat_assets.core.trainer import ema_schedule, linear_decay_then_hold, resolve_precision, trainer_overrides


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


def test_amp_auto_is_off_on_the_cpu_and_bf16_only_on_a_gpu_with_native_bf16(monkeypatch):
    assert load_settings({"profile": "embedded"}, environ={}).amp == "auto"
    assert load_settings({"profile": "coco", "pretrain_from_scratch": True}, environ={}).amp == "auto"
    assert resolve_precision("auto", "cpu") == "off"
    assert resolve_precision("off", "cuda:0") == "off"
    assert resolve_precision("bf16", "cpu") == "bf16"  # PyTorch's CPU autocast: how the tests run the GPU path
    monkeypatch.setattr(trainer_module, "_native_bf16", lambda device: True)  # an Ampere or newer GPU
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("fp16", "cuda:1") == "fp16"
    monkeypatch.setattr(trainer_module, "_native_bf16", lambda device: False)  # a V100 or T4
    assert resolve_precision("auto", "cuda:0") == "off"
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_precision("bf16", "cuda:0")


def test_amp_that_cannot_run_on_the_device_is_refused_by_name():
    with pytest.raises(ValueError, match="QAT_AMP=fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="QAT_AMP=bf16 runs on CUDA or the CPU"):
        resolve_precision("bf16", "mps")
    with pytest.raises(SettingsError, match="QAT_AMP"):
        load_settings({"profile": "smoke", "amp": "fp32"}, environ={})
    with pytest.raises(SettingsError, match="amp fp16 needs a CUDA device"):
        load_settings({"profile": "smoke", "amp": "fp16", "device": "cpu"}, environ={})
    # fp16's GradScaler would unscale the weights' optimizer only, not LSQ's own scale optimizer.
    with pytest.raises(SettingsError, match="lsq_scales needs amp"):
        load_settings({"profile": "smoke", "amp": "fp16", "lsq_scales": True}, environ={})
    assert load_settings({"profile": "smoke", "amp": "bf16", "lsq_scales": True}, environ={}).amp == "bf16"


def test_runs_validated_at_different_cadences_are_not_compared():
    """The same weights, but a sparser cadence can miss the peak the collapse ratio divides by. With every epoch
    validated the final window changes nothing, so it does not split runs."""
    every, window, sparse = (load_settings({"profile": "smoke", "qat_epochs": 20, **extra}, environ={}) for extra in (
        {}, {"qat_val_final_epochs": 11}, {"qat_val_interval": 5, "qat_val_final_epochs": 10}))
    assert every.training_profile_fingerprint() == window.training_profile_fingerprint()
    assert sparse.training_profile_fingerprint() != every.training_profile_fingerprint()
    assert sparse.training_profile()["qat_validation_cadence"] == [5, 10]


def test_settings_added_later_leave_the_fingerprints_of_earlier_runs_alone():
    """At the values every run had before they existed (Ultralytics' 5e-4 decay, every epoch validated), the
    fingerprints are those recorded before: trajectories resume, summaries stay comparable. Pinned values from
    the code before either setting (commit e6d21fe)."""
    from qat_assets.core.settings import QAT_FIELDS

    smoke, embedded = (load_settings({"profile": profile}, environ={}) for profile in ("smoke", "embedded"))
    assert (smoke.training_profile_fingerprint(), smoke.fingerprint_of(QAT_FIELDS)) == ("29d5291fd5ecd3e7", "553762c9c2b375e7")
    assert (embedded.training_profile_fingerprint(), embedded.fingerprint_of(QAT_FIELDS)) == ("ab924ff84cfe75c5", "82805bc158b6fb01")
    decayed = load_settings({"profile": "smoke", "qat_weight_decay": 0.01}, environ={})
    assert decayed.added_training_fields() == {"qat_weight_decay": 0.01}
    assert decayed.training_profile_fingerprint() != smoke.training_profile_fingerprint()


def test_runs_are_compared_on_the_precision_amp_resolved_to_not_on_the_setting():
    """`auto` trains bf16 on one GPU and fp32 on another; `auto` and `off` on a CPU train alike."""
    from qat_assets.core.comparison import find_non_comparable
    from qat_assets_tests.core.test_summary import make_summary

    off, bf16 = (load_settings({"profile": "smoke", "amp": amp}, environ={}) for amp in ("off", "bf16"))
    assert off.training_profile_fingerprint() == bf16.training_profile_fingerprint()
    runs = [make_summary(seed=seed) for seed in range(3)]
    runs = [run.model_copy(update={"training": {**run.training, "precision": precision}})
            for run, precision in zip(runs, ("off", "off", "bf16"))]
    assert list(find_non_comparable(runs).values()) == [
        "trained in precision bf16 != off (reference: majority of 3 runs, ties going to the newest run)"]
    # a summary written before the precision was recorded trained in fp32
    older = runs[0].model_copy(update={"training": {k: v for k, v in runs[0].training.items() if k != "precision"}})
    assert find_non_comparable([older, *runs[1:2]]) == {}
    # Resuming is decided on the resolved precision (next test), not on the setting.
    assert "amp" not in QAT_FIELDS and "amp" not in PRETRAIN_FIELDS


def test_every_evaluation_records_its_precision_and_hands_ultralytics_only_its_own_arguments():
    from ultralytics.cfg import get_cfg

    settings = evaluation_settings(64, 8)
    assert settings["precision"] == "fp32"
    arguments = validator_arguments(64, 8)
    assert {**arguments, "precision": "fp32"} == settings
    assert get_cfg(overrides=arguments).quantize is None  # Ultralytics' fp32 inference
    with pytest.raises(SyntaxError, match="precision"):
        get_cfg(overrides=settings)


def test_fp16_switches_on_a_grad_scaler_after_setup_and_a_resumed_run_keeps_its_loss_scale(tmp_path):
    """The fp16 branch, which needs CUDA to train (no GPU here): the switch itself, on a real trainer. A resumed run
    continues at the loss scale it had reached instead of backing off from 65536 again, skipping steps."""
    from pathlib import Path

    from qat_assets.core.trainer import ResumableTrainer, trainer_overrides
    from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

    data = Path(write_tiny_yolo_set(tmp_path / "set", 2, 64))
    overrides = trainer_overrides(load_settings({"profile": "smoke"}, environ={}), "yolo10n", data, tmp_path / "run",
                                  "cpu", 1, 0)
    reached = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()

    def trainer(precision: str, **changes) -> ResumableTrainer:
        return ResumableTrainer(
            model=build_detection_model("yolo10n", ["red", "green", "blue"]), overrides={**overrides, **changes},
            run_dir=tmp_path / "run", precision=precision, ema=ema_schedule(0.0, None, 1, 1), on_epoch=lambda _: None,
            state_fingerprint="test", resume_state={"scaler": reached},
        )

    fp16 = trainer("fp16")
    fp16.amp, fp16.scaler = False, torch.amp.GradScaler("cpu", enabled=False)  # as Ultralytics' setup leaves them
    fp16._switch_on_precision()
    assert fp16.amp and fp16.args.amp is False  # Ultralytics' fp16 branch: autocast(True), the device's fp16 on CUDA
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 1024.0
    # Ultralytics' own amp on would run check_amp (a download) in its setup: refused at construction.
    with pytest.raises(ValueError, match="Ultralytics' amp off"):
        trainer("bf16", amp=True)


def test_a_trajectory_is_resumed_only_in_the_precision_it_was_trained_in(monkeypatch, tmp_path):
    """`auto` is one setting and two precisions: a trajectory a GPU trained in bf16 restarts on a CPU (fp32)."""
    from qat_assets.core.qat import trajectory_fingerprint
    from qat_assets.core.requests import QATRequest

    def fingerprint(**settings) -> str:
        return trajectory_fingerprint(QATRequest(
            variant="yolo10n", method="ema", seed=0, pretrained_checkpoint=tmp_path / "p.pt", pretrained_sha256="0" * 64,
            dataset_yaml=tmp_path / "d.yaml", dataset_fingerprint="d", train_images=16, out_dir=tmp_path / "o",
            trajectory_dir=tmp_path / "t", settings=load_settings({"profile": "smoke", **settings}, environ={}),
        ))

    monkeypatch.setattr(trainer_module, "_native_bf16", lambda device: True)
    assert fingerprint(device="cpu") == fingerprint(device="cpu", amp="off")  # auto is fp32 on the CPU
    assert fingerprint(device="cuda:0") != fingerprint(device="cpu")
    assert fingerprint(device="cuda:0", amp="off") == fingerprint(device="cpu", amp="off")  # the device alone is not
    assert fingerprint(device="cuda:0") == fingerprint(device="cuda:0", amp="bf16")
