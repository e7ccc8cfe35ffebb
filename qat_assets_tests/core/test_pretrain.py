"""The FP plateau check, against its definition; the FP LR schedule that lets a run show its plateau; the
sparse FP validation schedule, which must not change what is trained."""

import pytest

from qat_assets.core.coco import convert_coco_subset
from qat_assets.core.models import CheckpointError
from qat_assets.core.pretrain import plateau_check, run_pretrain, validated_fp_epochs
from qat_assets.core.requests import PretrainRequest
from qat_assets.core.settings import SettingsError, load_settings
from qat_assets.core.synthetic import write_synthetic_coco
from qat_assets.core.trainer import ResumableTrainer


def history(values):
    return [{"epoch": 0, "map50_95": 0.0}] + [{"epoch": i + 1, "map50_95": v} for i, v in enumerate(values)]


def test_gain_is_best_of_the_window_minus_best_before_it():
    # window of 3: best before = 0.50 (epoch 2), best in window = 0.56 -> gain 0.06, not at plateau
    check = plateau_check(history([0.40, 0.50, 0.45, 0.56, 0.52]), epochs=3, min_gain=0.01)
    assert abs(check["gain"] - 0.06) < 1e-12
    assert check["at_plateau"] is False and "NOT at plateau" in check["reason"]


def test_the_window_records_the_largest_lr_it_trained_at():
    lrs = [1e-2, 5e-3, 1e-3, 2e-4, 2e-4]
    records = [{**h, "lr": lr} for h, lr in zip(history([0.2, 0.5, 0.6, 0.6, 0.6])[1:], lrs)]
    check = plateau_check([{"epoch": 0, "map50_95": 0.0}, *records], epochs=3, min_gain=0.01)
    assert check["window_max_lr"] == 1e-3 and "at LR <= 0.001" in check["reason"]
    assert plateau_check(history([0.2, 0.5, 0.6, 0.6]), epochs=3, min_gain=0.01)["window_max_lr"] is None


def test_a_flat_but_noisy_tail_is_at_plateau():
    check = plateau_check(history([0.20, 0.70, 0.69, 0.705, 0.698]), epochs=3, min_gain=0.01)
    assert abs(check["gain"] - 0.005) < 1e-12 and check["at_plateau"] is True


def test_a_history_no_longer_than_the_window_cannot_tell():
    check = plateau_check(history([0.1, 0.2, 0.3]), epochs=3, min_gain=0.01)
    assert check["gain"] is None and check["at_plateau"] is None and "needs more than 3" in check["reason"]


def test_unvalidated_epochs_are_left_out_of_the_check():
    full = history([0.20, 0.50, 0.60, 0.55, 0.61, 0.605, 0.608])
    sparse = [h if h["epoch"] in (0, 2, 4, 5, 6, 7) else {**h, "map50_95": None} for h in full]
    # Window of 3 (epochs 5-7), best before = 0.60 at epoch 3 in full, 0.55 at epoch 4 when epoch 3 was skipped:
    # the sparse history can only understate the best before, so it reads a larger gain, never a smaller one.
    assert plateau_check(full, epochs=3, min_gain=0.01)["gain"] == pytest.approx(0.01)
    assert plateau_check(sparse, epochs=3, min_gain=0.01)["gain"] == pytest.approx(0.06)
    unvalidated_window = [h if h["epoch"] < 5 else {**h, "map50_95": None} for h in full]
    check = plateau_check(unvalidated_window, epochs=3, min_gain=0.01)
    assert check["at_plateau"] is None and "0 validated in the last 3" in check["reason"]


def test_fp_validates_every_interval_and_densely_from_the_epoch_before_the_window():
    validated = validated_fp_epochs(epochs=40, interval=5, plateau_epochs=10)
    assert [e for e in range(1, 41) if validated(e)] == [5, 10, 15, 20, 25, *range(30, 41)]
    assert all(validated_fp_epochs(epochs=12, interval=1, plateau_epochs=10)(e) for e in range(1, 13))


def pretrain(tmp_path, name: str, **overrides):
    settings = load_settings({"profile": "smoke", "storage": str(tmp_path), **overrides}, environ={})
    if not (tmp_path / "subset").is_dir():
        write_synthetic_coco(tmp_path / "coco", train_images=16, val_images=8, image_size=64, seed=0)
    subset = convert_coco_subset(tmp_path / "coco", tmp_path / "subset", train_images=16, val_images=8, seed=0,
                                 skip_bad_items=False)
    return run_pretrain(
        PretrainRequest(variant="yolo10n", dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
                        names=subset.class_names, train_images=16, out_dir=tmp_path / name, settings=settings),
        log=lambda message: None,
    )


def test_pretraining_holds_the_final_lr_over_the_last_epochs_and_validates_only_where_asked(tmp_path):
    # Three smoke epochs, the last one held: the epochs run at lr0 x (1, 1 - (1 - lrf)/2, lrf), where
    # Ultralytics' schedule alone would still be at lr0 x (1 + 2 lrf)/3 in the third.
    recipe = {"pretrain_epochs": 3, "pretrain_lr_hold_epochs": 1, "pretrain_warmup_epochs": 0,
              "pretrain_optimizer": "SGD", "pretrain_lr": 0.01, "pretrain_lrf": 0.1, "plateau_epochs": 1}
    sparse = pretrain(tmp_path, "sparse", **recipe, pretrain_val_interval=2)
    assert [h["lr"] for h in sparse["history"]] == pytest.approx([0.01, 0.01 * 0.55, 0.001])
    # Every 2nd epoch and from the one before the 1-epoch window: epoch 1 is not validated, and says so.
    assert [h["map50_95"] is None for h in sparse["history"]] == [True, False, False]
    assert [h["precision"] is None for h in sparse["history"]] == [True, False, False]
    assert [h["validation_seconds"] is None for h in sparse["history"]] == [True, False, False]
    assert all(0 < h["validation_seconds"] < h["seconds"] for h in sparse["history"][1:])
    # Skipping a validation changes nothing that is trained: the same model as validating every epoch.
    dense = pretrain(tmp_path, "dense", **recipe, pretrain_val_interval=1)
    assert dense["metrics"] == sparse["metrics"] and dense["history"][1:] == [
        {**h, "seconds": d["seconds"], "validation_seconds": d["validation_seconds"]}
        for h, d in zip(sparse["history"][1:], dense["history"][1:])
    ]


def test_the_coco_profile_refuses_to_train_the_fp_model_from_scratch_unless_asked(tmp_path):
    with pytest.raises(SettingsError, match="QAT_CHECKPOINT_DIR is unset and QAT_PRETRAIN_FROM_SCRATCH is false"):
        load_settings({"profile": "coco"}, environ={})
    assert load_settings({"profile": "coco"}, environ={"QAT_PRETRAIN_FROM_SCRATCH": "true"}).pretrain_from_scratch
    assert load_settings({"profile": "coco"}, environ={"QAT_CHECKPOINT_DIR": str(tmp_path)}).checkpoint_dir == tmp_path
    assert load_settings({"profile": "embedded"}, environ={}).pretrain_from_scratch  # the CPU profiles train here


def test_without_the_variants_checkpoint_in_the_folder_pretraining_stops_before_training(tmp_path):
    with pytest.raises(CheckpointError, match=r"no yolov10n\.pt in QAT_CHECKPOINT_DIR=.*QAT_PRETRAIN_FROM_SCRATCH=true"):
        pretrain(tmp_path, "fp", checkpoint_dir=str(tmp_path / "weights"), pretrain_from_scratch=False)
    assert not (tmp_path / "fp").exists()


def test_a_batch_ultralytics_halved_after_an_oom_is_recorded_as_the_batch_used(tmp_path, monkeypatch):
    """The first training batch at the configured size raises the error a GPU out of memory raises; Ultralytics'
    own retry (first epoch only) halves the batch and restarts the epoch. The record says what really ran."""
    seen: list[int] = []
    real = ResumableTrainer.preprocess_batch

    def out_of_memory_once(self, batch):
        seen.append(len(batch["img"]))
        if len(seen) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(ResumableTrainer, "preprocess_batch", out_of_memory_once)
    result = pretrain(tmp_path, "oom", pretrain_epochs=2, plateau_epochs=1)
    assert seen[0] == 8 and set(seen[1:]) == {4}  # smoke: batch 8, then 16 images in batches of 4
    assert [h["batch"] for h in result["history"]] == [4, 4]
    assert result["training_batch"] == {"configured": 8, "used": [4], "halved": True}

    monkeypatch.undo()
    unhalved = pretrain(tmp_path, "ok")
    assert [h["batch"] for h in unhalved["history"]] == [8]
    assert unhalved["training_batch"] == {"configured": 8, "used": [8], "halved": False}
