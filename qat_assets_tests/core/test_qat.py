"""The QAT stage's shared trajectory: one training per seed gives both methods, and the baseline it gives is
exactly the EMA-decay-0 run the baseline used to train on its own."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qat_assets.core import qat, within_seed
from qat_assets.core.artifacts import exclusive_lock, load_checkpoint, read_sidecar, save_checkpoint
from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.models import load_float_model
from qat_assets.core.qat import method_history, quant_options, run_qat, train_trajectory
from qat_assets.core.quantize import freeze_quantized_weights, learned_scales, quantize_w4a16
from qat_assets.core.requests import QATRequest
from qat_assets.core.settings import load_settings
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
    # The NMS-free head of the weights each method evaluates: the FP model's before quantization, the final
    # checkpoint's `ema` entry after (re-evaluated here from the saved weights with nms=False).
    assert baseline["one_to_one"]["fp"] == ema["one_to_one"]["fp"]
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
