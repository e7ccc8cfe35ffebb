"""The QAT stage's shared trajectory: one training per seed gives both methods, and the baseline it gives is
exactly the EMA-decay-0 run the baseline used to train on its own."""

import contextlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qat_assets.core import qat, within_seed
from qat_assets.core.artifacts import exclusive_lock, load_checkpoint, read_sidecar, save_checkpoint
from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.host_syncs import count_host_syncs, optimizer_host_state
from qat_assets.core.models import load_float_model
from qat_assets.core.qat import method_history, quant_options, run_qat, train_trajectory
from qat_assets.core.quantize import freeze_quantized_weights, learned_scales, quantize_w4a16
from qat_assets.core.requests import QATRequest
from qat_assets.core.settings import QAT_FIELDS, SettingsError, load_settings
from qat_assets.core.stability import classify_qat
from qat_assets.core.summary import EpochRecord
from qat_assets.core.trainer import ema_schedule
from qat_assets.core.verdict import build_run_summary
from qat_assets_tests.execution.test_worker import pretrained  # noqa: F401 (a fixture: a smoke set and a 1-epoch FP yolo10n)

METRICS = ("map50_95", "map50", "precision", "recall")


def request_for(pretrained, method: str, trajectory: Path, out_dir: Path) -> QATRequest:
    root, subset, result = pretrained
    return QATRequest(
        variant="yolo10n", method=method, seed=0, pretrained_checkpoint=result["checkpoint"],
        pretrained_sha256=result["sha256"], dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
        train_images=16, out_dir=out_dir, trajectory_dir=trajectory,
        settings=load_settings({"profile": "smoke", "storage": str(root)}, environ={}),
    )


def test_method_history_gives_ema_the_ema_copy_and_baseline_the_live_weights():
    trajectory = [
        {"epoch": 0, "map50_95": 0.30, "map50": 0.5},
        {"epoch": 1, "map50_95": 0.40, "map50": 0.6, "box_loss": 1.0, "live": {"map50_95": 0.35, "map50": 0.55}},
    ]
    assert method_history(trajectory, "ema") == [trajectory[0], {"epoch": 1, "map50_95": 0.40, "map50": 0.6, "box_loss": 1.0}]
    assert method_history(trajectory, "baseline")[1] == {"epoch": 1, "map50_95": 0.35, "map50": 0.55, "box_loss": 1.0}


def test_both_methods_share_one_training_and_the_baseline_is_the_decay_0_run(pretrained, tmp_path, monkeypatch):
    lines: list[str] = []
    trajectory = tmp_path / "trajectory"
    validated: list[dict[str, torch.Tensor]] = []  # the weights of every model the trajectory validates, in order

    def recording_freeze(model):
        validated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return freeze_quantized_weights(model)

    def evaluate_whole_set_only(*args, per_image=None, **kwargs):
        assert per_image is None, "the second run validated the final weights again for the within-seed bootstrap"
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(qat, "freeze_quantized_weights", recording_freeze)
    baseline = run_qat(request_for(pretrained, "baseline", trajectory, tmp_path / "baseline"), log=lines.append)
    monkeypatch.undo()
    # The second run reads the first one's within-seed result: no validation for it, no bootstrap.
    monkeypatch.setattr(qat, "evaluate_model", evaluate_whole_set_only)
    monkeypatch.setattr(within_seed, "paired_bootstrap", lambda *a, **k: pytest.fail("the second run bootstrapped again"))
    ema = run_qat(request_for(pretrained, "ema", trajectory, tmp_path / "ema"), log=lines.append)
    monkeypatch.undo()
    assert baseline["resume"] == "fresh start" and ema["resume"].startswith("already complete")
    baseline_state, ema_state = (load_checkpoint(Path(r["checkpoint"])) for r in (baseline, ema))
    assert all(torch.equal(baseline_state["model"][k], ema_state["model"][k]) for k in baseline_state["model"])
    # each checkpoint's `ema` entry is what its method evaluates (QC and the export read it)
    assert all(torch.equal(baseline_state["model"][k], baseline_state["ema"][k]) for k in baseline_state["model"])
    assert not all(torch.equal(ema_state["model"][k], ema_state["ema"][k]) for k in ema_state["model"])
    assert baseline["ema"]["decay"] == 0.0 and ema["ema"]["decay"] > 0
    assert [h["epoch"] for h in baseline["history"]] == [h["epoch"] for h in ema["history"]] == [0, 1, 2]
    assert baseline["history"][0] == ema["history"][0]  # PTQ: one model before any averaging
    # Every trained epoch records the collapse diagnostics of the live weights, in the summary's schema.
    for record in baseline["history"][1:]:
        diagnostics = EpochRecord(**record).diagnostics
        assert diagnostics.model["layers"] == sum(1 for row in diagnostics.layers if row.bit_width == 4) > 0
        assert len(diagnostics.bn) > 0 and all(row.log_var_mismatch >= 0 for row in diagnostics.bn)
    # The NMS-free head of the weights each method evaluates: the FP model's before quantization, measured once
    # by the FP stage (no QAT run validates it: see `validated` below), the final checkpoint's `ema` entry after
    # (re-evaluated here from the saved weights with nms=False).
    fp_sidecar = read_sidecar(pretrained[2]["checkpoint"])
    assert baseline["one_to_one"]["fp"] == ema["one_to_one"]["fp"] == fp_sidecar["one_to_one_metrics"]
    fp_model, _ = load_float_model(pretrained[2]["checkpoint"])
    smoke = request_for(pretrained, "baseline", trajectory, tmp_path).settings
    fp_again = evaluate_model(fp_model, pretrained[1].dataset_yaml, imgsz=smoke.imgsz, batch=smoke.batch, device="cpu",
                              workers=0, work_dir=tmp_path / "fp_again", nms=False)
    assert {m: fp_again[m] for m in METRICS} == {m: fp_sidecar["one_to_one_metrics"][m] for m in METRICS}
    for result, state in ((baseline, baseline_state), (ema, ema_state)):
        assert result["one_to_one"]["final"]["epoch"] == 2
        settings = request_for(pretrained, result["method"], trajectory, tmp_path).settings
        model, _ = load_float_model(pretrained[2]["checkpoint"])
        quantize_w4a16(model, quant_options(settings))
        model.load_state_dict(state["ema"])
        again = evaluate_model(freeze_quantized_weights(model), pretrained[1].dataset_yaml, imgsz=settings.imgsz,
                               batch=settings.batch, device="cpu", workers=0, work_dir=tmp_path / "again", nms=False)
        assert {m: again[m] for m in METRICS} == {m: result["one_to_one"]["final"][m] for m in METRICS}
    # PTQ, then per epoch the EMA copy and the live weights (the last two are the checkpoints' ema and model),
    # then the baseline's final weights once more for the NMS-free head; none for the within-seed bootstrap
    assert len(validated) == 1 + 2 * 2 + 1
    # Both sidecars carry the one within-seed result of the trajectory, from the last epoch's own validations:
    # its mAPs are those the histories recorded for the final EMA copy and live weights.
    within = ema["within_seed"]
    assert baseline["within_seed"] == within and within["source"] == "last epoch's validation"
    assert (within["epoch"], within["images"], within["resamples"], within["seed"]) == (2, 8, 200, 0)
    assert within["ema_map50_95"] == pytest.approx(ema["history"][-1]["map50_95"], abs=1e-12)
    assert within["live_map50_95"] == pytest.approx(baseline["history"][-1]["map50_95"], abs=1e-12)
    assert within["difference"] == within["ema_map50_95"] - within["live_map50_95"]
    summary = build_run_summary(ema, None, partition_key="ema|0", dataset={"fingerprint": "data"},
                                settings=request_for(pretrained, "ema", trajectory, tmp_path).settings)
    assert summary.within_seed.model_dump() == within  # what the comparison reads
    # The smoke model's mAP is 0 (one FP epoch on 16 images), so the statistics themselves are checked: every
    # val image scored with its predictions, and the EMA copy's differ from the live weights'.
    fingerprint = qat.trajectory_fingerprint(request_for(pretrained, "ema", trajectory, tmp_path))
    kept, _ = within_seed.stored_final_images(trajectory, fingerprint, 2)
    assert all(len(image.conf) > 0 for images in kept.values() for image in images)
    assert any(not np.array_equal(e.conf, l.conf) for e, l in zip(kept["ema"], kept["live"]))

    # Without stored statistics (a trajectory trained by older code) a run validates the final weights again and
    # finds the last epoch's own statistics.
    for name in (within_seed.IMAGES_FILE, within_seed.RESULT_FILE):
        (trajectory / name).unlink()
    again = run_qat(request_for(pretrained, "ema", trajectory, tmp_path / "ema_again"), log=lines.append)["within_seed"]
    assert again["source"] == "evaluated again" and any("two val passes" in line for line in lines)
    evaluated, _ = within_seed.stored_final_images(trajectory, fingerprint, 2)

    def same_predictions(first, second) -> bool:
        """The ten most confident predictions per image agree to 2e-7. Validation fuses Conv+BN, training's does
        not: here they differ by 1e-8, while the EMA copy's differ from the live weights' by 3e-6."""
        return all(a.name == b.name and np.allclose(np.sort(a.conf)[-10:], np.sort(b.conf)[-10:], rtol=0, atol=2e-7)
                   for a, b in zip(first, second))

    assert same_predictions(kept["ema"], evaluated["ema"]) and same_predictions(kept["live"], evaluated["live"])
    assert not same_predictions(kept["ema"], evaluated["live"])  # the check can tell the two weights apart
    for expected, seen in ((ema_state["ema"], validated[-3]), (ema_state["model"], validated[-2]),
                           (baseline_state["ema"], validated[-1])):
        assert all(torch.equal(expected[k], seen[k]) for k in expected)

    # The former baseline: its own training with EMA decay 0, which validates the live weights as its EMA copy.
    request = request_for(pretrained, "baseline", tmp_path / "decay0", tmp_path / "unused")
    model, _ = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    quantize_w4a16(model, quant_options(request.settings))
    history, state, diverged_at, _ = train_trajectory(request, model, ema_schedule(0.0, None, 4, 2), lines.append)
    assert diverged_at is None
    assert all(torch.equal(state["model"][k].cpu(), baseline_state["model"][k]) for k in baseline_state["model"])
    for alone, shared in zip(method_history(history, "ema"), baseline["history"]):
        assert {m: alone[m] for m in METRICS} == {m: shared[m] for m in METRICS}
    # Known answer: its EMA copy is the live weights, so EMA - live is exactly 0 on every resampled val set.
    same = within_seed.within_seed_uncertainty(
        tmp_path / "decay0", qat.trajectory_fingerprint(request), 2, resamples=200, seed=0,
        evaluate=lambda which: pytest.fail("the decay-0 trajectory kept no per-image statistics"), log=lines.append)
    assert (same.difference, same.std, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0, 0.0)
    assert same.ema_map50_95 == same.live_map50_95 == within["live_map50_95"]
    identical, _ = within_seed.stored_final_images(tmp_path / "decay0", qat.trajectory_fingerprint(request), 2)
    for e, l in zip(identical["ema"], identical["live"]):  # prediction for prediction, as the weights are equal
        assert np.array_equal(e.conf, l.conf) and np.array_equal(e.tp, l.tp) and len(e.conf) > 0


def test_the_second_method_waits_for_the_trajectory_in_training(tmp_path):
    lock = tmp_path / "trajectory" / "lock"
    waited: list[str] = []
    order: list[str] = []

    def second() -> None:
        with exclusive_lock(lock, on_wait=lambda: waited.append("waiting")):
            order.append("second")

    with exclusive_lock(lock, on_wait=lambda: pytest.fail("nobody held the lock")):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        order.append("first done")
    thread.join(timeout=10)
    assert waited == ["waiting"] and order == ["first done", "second"]


def test_a_diverged_trajectory_is_the_result_of_both_methods_and_is_not_trained_again(pretrained, tmp_path, monkeypatch):
    # A NaN in one BN scale of the starting point makes the very first training loss NaN.
    root, subset, result = pretrained
    state = load_checkpoint(Path(result["checkpoint"]))["model"]
    state[next(k for k in state if k.endswith("bn.weight"))][0] = float("nan")
    sidecar = {k: v for k, v in read_sidecar(Path(result["checkpoint"])).items() if k not in ("sha256", "file")}
    digest = save_checkpoint(tmp_path / "poisoned" / "pretrained.pt", {"model": state}, sidecar)
    poisoned = (root, subset, {"checkpoint": str(tmp_path / "poisoned" / "pretrained.pt"), "sha256": digest})
    trajectory = tmp_path / "trajectory"
    baseline = run_qat(request_for(poisoned, "baseline", trajectory, tmp_path / "baseline"), log=lambda line: None)
    assert baseline["diverged_at_epoch"] == 1

    lines: list[str] = []
    monkeypatch.setattr(qat, "ResumableTrainer", lambda **kwargs: pytest.fail("the diverged trajectory was trained again"))
    ema = run_qat(request_for(poisoned, "ema", trajectory, tmp_path / "ema"), log=lines.append)
    assert ema["diverged_at_epoch"] == 1 and ema["completed_epochs"] == 0
    assert any("the trajectory DIVERGED in epoch 1 when it was trained" in line for line in lines)


def test_lsq_scales_train_with_their_own_optimizer_and_their_trajectory_is_recorded(pretrained, tmp_path):
    request = request_for(pretrained, "baseline", tmp_path / "lsq", tmp_path / "unused")
    settings = request.settings.model_copy(update={"lsq_scales": True, "scale_lr": 1e-3})
    request = request.model_copy(update={"settings": settings})
    model, _ = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    quantize_w4a16(model, quant_options(settings))
    initial = {scale.name: scale.parameter.detach().clone() for scale in learned_scales(model)}
    history, state, diverged_at, _ = train_trajectory(request, model, ema_schedule(0.0, None, 4, 2), lambda line: None)
    assert diverged_at is None
    saved = torch.load(request.trajectory_dir / "train_state.pt", map_location="cpu", weights_only=True)
    steps = 2 * 2  # 16 images, batch 8, 2 epochs
    assert all(entry["step"] == steps for entry in saved["scale_optimizer"]["state"].values())
    assert len(saved["scale_optimizer"]["state"]) == len(initial)
    moved = max(float((state["model"][name].cpu() - value).abs().max()) for name, value in initial.items())
    # Adam moves a scale by about its LR per step (at most ~3x), whatever the size of the gradient.
    assert 0 < moved <= 3.2 * 1e-3 * steps
    # The mean step size of every layer is recorded per epoch: the scale trajectory.
    trajectories = [[row["scale"] for row in record["diagnostics"]["layers"]] for record in history[1:]]
    assert len(trajectories) == 2 and trajectories[0] != trajectories[1]


def test_qat_validates_every_interval_and_every_epoch_of_the_final_window():
    validated = qat.validated_qat_epochs(epochs=100, interval=5, final_epochs=10)
    assert [e for e in range(1, 101) if validated(e)] == [*range(5, 91, 5), *range(91, 101)]
    assert [e for e in range(1, 8) if qat.validated_qat_epochs(7, 3, 1)(e)] == [3, 6, 7]  # the last epoch always
    assert all(qat.validated_qat_epochs(4, 1, 1)(e) for e in range(1, 5))  # interval 1: every epoch, as before


def test_the_cadence_settings_keep_the_final_median_inside_the_final_window():
    for profile in ("smoke", "embedded", "coco"):  # every profile validates every QAT epoch
        settings = load_settings({"profile": profile, "checkpoint_dir": "/weights"}, environ={})
        assert settings.qat_val_interval == 1
    assert "qat_val_interval" not in QAT_FIELDS and "qat_val_final_epochs" not in QAT_FIELDS  # tested: same weights
    with pytest.raises(SettingsError, match="qat_val_final_epochs 2 is shorter than stability_window 3"):
        load_settings({"profile": "smoke", "qat_epochs": 10, "qat_val_interval": 2, "qat_val_final_epochs": 2}, environ={})
    assert load_settings({"profile": "smoke", "qat_epochs": 2, "qat_val_interval": 2, "qat_val_final_epochs": 2},
                         environ={}).qat_val_final_epochs == 2  # a run shorter than the window validates all of it


def test_a_sparse_cadence_validates_the_expected_epochs_and_trains_the_same_weights(pretrained, tmp_path):
    # 5 epochs, every 2nd validated and the last 2: epochs 2, 4 and 5; epochs 1 and 3 train without a validation.
    results, trajectories = {}, {}
    for interval in (2, 1):
        request = request_for(pretrained, "ema", tmp_path / f"trajectory-k{interval}", tmp_path / f"k{interval}")
        # The sparse run also measures the +BN curve, which runs at the validated epochs only.
        settings = load_settings({"profile": "smoke", "storage": str(pretrained[0]), "qat_epochs": 5, "stability_window": 2,
                                  "qat_val_interval": interval, "qat_val_final_epochs": 2,
                                  "bn_reestimate_every_eval": interval == 2, "bn_reestimation_batches": 1}, environ={})
        results[interval] = run_qat(request.model_copy(update={"settings": settings}), log=lambda line: None)
        trajectories[interval] = json.loads((request.trajectory_dir / "history.json").read_text())
    sparse, dense = trajectories[2], trajectories[1]
    assert [h["epoch"] for h in sparse] == list(range(6)) and results[2]["validated_epochs"] == [2, 4, 5]
    assert results[1]["validated_epochs"] == [1, 2, 3, 4, 5]
    for record in sparse[1:]:
        validated = record["epoch"] in (2, 4, 5)
        metrics = [record[m] for m in METRICS] + [record["live"][m] for m in METRICS]
        assert all(v is not None for v in metrics) if validated else all(v is None for v in metrics)
        assert [record[k] is not None for k in ("diagnostics", "validation_seconds", "bn_reestimated")] == [validated] * 3
        assert record["box_loss"] is not None and record["oscillating_fraction"] is not None  # trained all the same
    # Skipping validations changes nothing that is trained: the same live weights and EMA copy, bit for bit,
    # and so the same metrics on the epochs both validated.
    states = {k: load_checkpoint(Path(results[k]["checkpoint"])) for k in results}
    for part in ("model", "ema"):
        assert all(torch.equal(states[2][part][name], states[1][part][name]) for name in states[1][part])
    for epoch in (0, 2, 4, 5):
        assert {m: sparse[epoch][m] for m in METRICS} == {m: dense[epoch][m] for m in METRICS}
        if epoch:
            assert sparse[epoch]["live"] == dense[epoch]["live"]
    # The verdict reads the validated epochs: both methods' sparse histories give the verdict of the dense
    # history restricted to epochs 0, 2, 4, 5, and the final window (epochs 4-5) is whole.
    for method in ("ema", "baseline"):
        as_read = [EpochRecord(**{k: v for k, v in h.items() if k in EpochRecord.model_fields})
                   for h in method_history(sparse, method)]
        only = [r for r in (EpochRecord(**{k: v for k, v in h.items() if k in EpochRecord.model_fields})
                            for h in method_history(dense, method)) if r.epoch in (0, 2, 4, 5)]
        verdict, expected = classify_qat(as_read, 5, window=2), classify_qat(only, 3, window=2)
        assert verdict.status != "incomplete" and (verdict.final_from_epoch, verdict.final_epoch) == (4, 5)
        assert verdict.model_dump() == expected.model_dump()


def test_a_qat_optimizer_step_makes_at_most_one_host_sync_of_its_own(pretrained, tmp_path, monkeypatch):
    """The whole training batch of a real QAT run, counted: forward, loss, backward, the divergence check, the
    optimizer step with clipping and the EMA, the weight quantization and the oscillation tracker. Only the
    divergence check reads a value on the host; Ultralytics' own loss (target assignment) and progress bar
    read some too, in FP training alike, and are not ours to remove."""
    counts: list = []

    class CountingTrainer(qat.ResumableTrainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._counting = contextlib.ExitStack()
            self.add_callback("on_train_batch_start", lambda trainer: trainer._start_counting())
            self.add_callback("on_train_batch_end", lambda trainer: trainer._stop_counting())

        def _start_counting(self):
            optimizers = [self.optimizer, self.scale_optimizer]
            host_side = lambda: [t for o in optimizers if o is not None for t in optimizer_host_state(o)]  # noqa: E731
            counts.append(self._counting.enter_context(count_host_syncs(host_side)))

        def _stop_counting(self):  # after the trainer's own on_train_batch_end callbacks (registered first)
            self._counting.close()

    monkeypatch.setattr(qat, "ResumableTrainer", CountingTrainer)
    request = request_for(pretrained, "baseline", tmp_path / "counted", tmp_path / "unused")
    request = request.model_copy(update={"settings": request.settings.model_copy(update={"qat_epochs": 1})})
    model, _ = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    quantize_w4a16(model, quant_options(request.settings))
    history, _, diverged_at, _ = train_trajectory(request, model, ema_schedule(0.0, None, 2, 2), lambda line: None)
    assert diverged_at is None and [h["epoch"] for h in history] == [0, 1]
    assert len(counts) == 2  # 16 images at batch 8, one optimizer step per batch
    for count in counts:
        ours = count.outside("ultralytics")
        assert [sync.module for sync in ours] == ["qat_assets.core.divergence"], count.by_place()
    assert all(len(count) > len(count.outside("ultralytics")) for count in counts)  # the counter saw Ultralytics'


@pytest.mark.parametrize("amp", ["auto", "bf16"])
def test_amp_trains_the_quantized_convs_under_autocast_validates_in_fp32_and_never_downloads(pretrained, tmp_path, monkeypatch, amp):
    """On the CPU `auto` is fp32 training; bf16 (PyTorch's CPU autocast) takes the mixed-precision path a GPU run
    takes: the quantized convs compute in bf16 from the fp32 grid prepared after each optimizer step, the
    validator sees the trainer with AMP off, and Ultralytics' online AMP check is never called."""
    import ultralytics.engine.trainer as ultralytics_trainer
    from ultralytics.engine.validator import BaseValidator

    from qat_assets.core.quantize import StepQuantConv2d, quantized_modules

    def no_download(*_):
        raise AssertionError("check_amp downloads yolo26n.pt")

    monkeypatch.setattr(ultralytics_trainer, "check_amp", no_download)
    validated_with_amp: list[bool] = []
    validate = BaseValidator.__call__

    def recording_validate(self, trainer=None, model=None, **kwargs):
        if trainer is not None:
            validated_with_amp.append(bool(trainer.amp))
        return validate(self, trainer, model, **kwargs)

    monkeypatch.setattr(BaseValidator, "__call__", recording_validate)
    quantized_under_autocast = []
    quant_weight = StepQuantConv2d.quant_weight

    def counting_quant_weight(self, *args, **kwargs):
        quantized_under_autocast.append(torch.is_autocast_enabled("cpu"))
        return quant_weight(self, *args, **kwargs)

    monkeypatch.setattr(StepQuantConv2d, "quant_weight", counting_quant_weight)

    request = request_for(pretrained, "baseline", tmp_path / "trajectory", tmp_path / "unused")
    settings = request.settings.model_copy(update={"amp": amp, "device": "cpu", "qat_epochs": 1})
    request = request.model_copy(update={"settings": settings})
    model, _ = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    quantize_w4a16(model, quant_options(settings))
    layers = quantized_modules(model)
    training_dtypes = []
    _, conv = next((name, module) for name, module in layers if module.in_channels > 3)
    conv.register_forward_hook(lambda module, _, out: training_dtypes.append(out.dtype) if module.training else None)
    history, _, diverged_at, _ = train_trajectory(request, model, ema_schedule(0.0, None, 2, 2), lambda line: None)

    assert diverged_at is None and history[-1]["epoch"] == 1 and history[-1]["map50_95"] is not None
    assert len(training_dtypes) == 2  # 16 images, batch 8: two training forwards
    expected = torch.bfloat16 if amp == "bf16" else torch.float32
    assert set(training_dtypes) == {expected}
    assert validated_with_amp and not any(validated_with_amp)
    # Only the first forward quantizes layer by layer (nothing was prepared before the first optimizer step); the
    # second reuses the flat pass's fp32 grid, prepared outside autocast, also when it runs under autocast.
    assert quantized_under_autocast.count(True) == (len(layers) if amp == "bf16" else 0)


def test_qat_weight_decay_reaches_the_weight_group_only_and_shrinks_the_weights(pretrained, tmp_path):
    """`qat_weight_decay` is the decay of Ultralytics' weight group (conv weights), never of BN or biases; a
    large decoupled decay (AdamW: w <- w (1 - lr wd) each step, beside Adam's update) shrinks the conv weights
    against the same run without it."""
    norms = {}
    for decay in (0.0, 1.0):
        request = request_for(pretrained, "baseline", tmp_path / f"wd{decay}", tmp_path / "unused")
        settings = request.settings.model_copy(update={"qat_optimizer": "AdamW", "qat_lr": 1e-2, "qat_weight_decay": decay})
        request = request.model_copy(update={"settings": settings})
        model, _ = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
        quantize_w4a16(model, quant_options(settings))
        _, state, diverged_at, _ = train_trajectory(request, model, ema_schedule(0.0, None, 4, 2), lambda line: None)
        assert diverged_at is None
        saved = torch.load(request.trajectory_dir / "train_state.pt", map_location="cpu", weights_only=True)
        decays = {group["param_group"]: group["weight_decay"] for group in saved["optimizer"]["param_groups"]}
        assert decays == {"weight": decay, "bn": 0.0, "bias": 0.0}
        norms[decay] = sum(float(v.float().norm()) for k, v in state["model"].items() if k.endswith("conv.weight"))
    # A trajectory trained at another decay is never resumed as this one.
    fingerprints = {decay: qat.trajectory_fingerprint(request_for(pretrained, "baseline", tmp_path / "x", tmp_path / "y").model_copy(
        update={"settings": request.settings.model_copy(update={"qat_weight_decay": decay})})) for decay in (5e-4, 1.0)}
    assert fingerprints[5e-4] != fingerprints[1.0]
    # 4 steps at lr 1e-2 x wd 1 (Ultralytics' largest): each weight keeps (1 - 0.01)^4 = 0.96 of itself, beside
    # Adam's own update, which is about the same in both runs.
    assert norms[1.0] < 0.98 * norms[0.0]
