"""The cost model's arithmetic against hand-computed answers, and measured epochs taking over from the table."""

import json

import pytest

from qat_assets.core import cost_model
from qat_assets.core.settings import load_settings

SMOKE = load_settings({"profile": "smoke"}, environ={})  # 16 train, 8 val, 8 calibration images, batch 8
HALF = {"yolo10n": 0.5, "yolo10s": 0.5}


def test_each_stage_is_images_times_epochs_times_seconds_per_image():
    fp, qat, post = cost_model.stages(SMOKE, ("yolo10n",), HALF, "given")
    evaluate = 0.5 * cost_model.EVAL_OVER_FP
    # FP: 16 images x 1 epoch; its one validated epoch, the final evaluation and its NMS-free head, 8 images each
    assert fp.seconds == pytest.approx(16 * 1 * 0.5 + 24 * evaluate)
    # QAT, one per seed (2): 16 x 2 epochs at 1.6x; EMA + live validations per epoch, PTQ, each method's final
    # NMS-free head (2)
    assert (qat.runs, qat.seconds_per_run) == (2, pytest.approx(16 * 2 * 0.8 + 8 * (2 * 2 + 1 + 2) * evaluate))
    # per partition (4): QC 8 calibration images x 16 epochs; 5 val passes, the held-out check, BN on 16 images
    assert (post.runs, post.seconds_per_run) == (4, pytest.approx(8 * 16 * 0.42 + (5 * 8 + 8 + 16) * evaluate))
    assert fp.arithmetic() == "1 x (16 x 1 x 0.5 s + 24 x 0.165 s)"


def test_qat_counts_the_validations_its_cadence_and_the_bn_curve_make():
    evaluate = 0.5 * cost_model.EVAL_OVER_FP
    # 10 epochs, every 4th and the last 3 validated: epochs 4, 8, 9, 10; with the +BN curve 4 validations each
    sparse = load_settings({"profile": "smoke", "qat_epochs": 10, "qat_val_interval": 4, "qat_val_final_epochs": 3,
                            "bn_reestimate_every_eval": True}, environ={})
    _, qat, _ = cost_model.stages(sparse, ("yolo10n",), HALF, "given")
    assert qat.seconds_per_run == pytest.approx(16 * 10 * 0.8 + 8 * (4 * 4 + 1 + 2) * evaluate)


def test_the_split_over_slots_is_never_below_the_longest_chain():
    planned = cost_model.stages(SMOKE, ("yolo10n", "yolo10s"), HALF, "given")
    total = sum(s.seconds for s in planned)
    chain = sum(s.seconds_per_run for s in planned[:3])  # FP, one seed's QAT, one partition's QC and export
    assert cost_model.split(planned, 1).wall_seconds == pytest.approx(total)
    assert cost_model.split(planned, 2).wall_seconds == pytest.approx(total / 2)
    assert cost_model.split(planned, 64).wall_seconds == pytest.approx(chain)


def test_a_release_checkpoint_costs_no_fp_training_and_the_coco_figures_are_labelled_estimates(tmp_path):
    coco = load_settings({"profile": "coco", "checkpoint_dir": str(tmp_path), "coco_root": str(tmp_path)}, environ={})
    per_image, source = cost_model.fp_seconds_per_image(coco, {})
    assert source.startswith("ESTIMATE") and per_image["yolo10n"] == 0.0036
    fp, qat, _ = cost_model.stages(coco, ("yolo10n",), per_image, source)
    # no training: the reference evaluation and its NMS-free head, 5,000 val images each
    assert fp.epochs == 0 and fp.seconds == pytest.approx(2 * 5000 * 0.33 * 0.0036)
    assert qat.train_images == 118287 and qat.epochs == 100
    assert cost_model.fp_seconds_per_image(coco, {"*": 0.002}) == (
        {"yolo10n": 0.002, "yolo10s": 0.002, "yolo10m": 0.002}, "given (--seconds-per-image)")


def test_measured_epochs_in_this_storages_sidecars_replace_the_table(tmp_path):
    def write(method: str, seconds: list[float], profile: str = "smoke") -> None:
        path = tmp_path / "yolo10n" / "qat_checkpoint" / f"{method}-0" / "qat_checkpoint.json"
        path.parent.mkdir(parents=True)
        history = [{"epoch": 0, "seconds": None}] + [{"epoch": e, "seconds": s} for e, s in enumerate(seconds, 1)]
        path.write_text(json.dumps({"settings": {"profile": profile, "imgsz": 64, "batch": 8}, "history": history}))

    write("baseline", [3.0, 5.0])
    write("ema", [4.0, 4.0])
    write("other", [100.0], profile="embedded")  # another profile's run says nothing about this one
    _, qat, _ = cost_model.stages(SMOKE, ("yolo10n",), HALF, "given", root=tmp_path)
    assert qat.source.startswith("measured: mean of 4 epochs in 2 sidecar(s)")
    # the mean epoch (4 s) per training image; its validations are inside it; then PTQ and 2 NMS-free heads
    assert qat.train_seconds_per_image == pytest.approx(4.0 / 16)
    assert qat.seconds_per_run == pytest.approx(16 * 2 * 0.25 + 8 * 3 * 0.5 * cost_model.EVAL_OVER_FP)


def test_measured_epochs_count_only_at_the_plans_precision_and_cadence(tmp_path):
    def write(name: str, seconds: float, precision: str | None, **settings) -> None:
        path = tmp_path / "yolo10n" / "qat_checkpoint" / f"{name}-0" / "qat_checkpoint.json"
        path.parent.mkdir(parents=True)
        sidecar = {"settings": {"profile": "smoke", "imgsz": 64, "batch": 8, **settings},
                   "history": [{"epoch": 1, "seconds": seconds}]}
        if precision is not None:
            sidecar["training_precision"] = precision
        path.write_text(json.dumps(sidecar))

    write("fp32", 4.0, "off")
    write("old", 6.0, None)  # written before the precision was recorded: fp32
    write("bf16", 1.0, "bf16")
    write("sparse", 0.5, "off", qat_val_interval=5)  # fewer validations per epoch: says nothing about every epoch
    fp_sidecar = tmp_path / "yolo10n" / "pretrained_checkpoint" / "pretrained.json"  # layout.pretrained_dir
    fp_sidecar.parent.mkdir(parents=True)
    fp_sidecar.write_text(json.dumps({"settings": {"profile": "smoke", "imgsz": 64, "batch": 8, "qat_val_interval": 5},
                                      "history": [{"epoch": 1, "seconds": 8.0}], "training_precision": "off"}))
    _, qat, _ = cost_model.stages(SMOKE, ("yolo10n",), HALF, "given", root=tmp_path, precision="off")
    assert qat.source.startswith("measured: mean of 2 epochs in 2 sidecar(s)")
    assert qat.train_seconds_per_image == pytest.approx(5.0 / 16)
    _, qat, _ = cost_model.stages(SMOKE, ("yolo10n",), HALF, "given", root=tmp_path, precision="bf16")
    assert qat.train_seconds_per_image == pytest.approx(1.0 / 16)
    # The FP epoch counts whatever the QAT cadence of the run that wrote it: only the FP stage's fields matter.
    fp, _, _ = cost_model.stages(SMOKE, ("yolo10n",), HALF, "given", root=tmp_path, precision="off")
    assert fp.source.startswith("measured: mean of 1 epochs") and fp.train_seconds_per_image == pytest.approx(8.0 / 16)
