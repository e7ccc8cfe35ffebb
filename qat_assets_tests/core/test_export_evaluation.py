"""Where and on how many val images the export stage measures the ONNX files' mAP (core/export_evaluation.py)."""

import json
from pathlib import Path

import pytest
import torch

from qat_assets.core import export_stage
from qat_assets.core.artifacts import save_checkpoint
from qat_assets.core.export_evaluation import EvaluationScope, evaluation_scope, val_image_files, val_subset_yaml
from qat_assets.core.models import load_float_model
from qat_assets.core.qat import quant_options
from qat_assets.core.quantize import quantize_w4a16
from qat_assets.core.requests import ExportRequest
from qat_assets.core.settings import load_settings
from qat_assets_tests.execution.test_worker import pretrained  # noqa: F401 (a fixture: a smoke set and a 1-epoch FP yolo10n)

ORT_CPU = ["CPUExecutionProvider"]
ORT_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_cpu_step_evaluates_the_whole_val_set_on_the_cpu():
    scope = evaluation_scope("cpu", ORT_GPU, 5000, 500)
    assert (scope.provider, scope.images, scope.is_subset) == ("CPUExecutionProvider", 5000, False)


@pytest.mark.parametrize("device", ["cuda:0", "cuda", "0", "0,1"])
def test_a_gpu_step_with_the_cuda_provider_evaluates_the_whole_val_set_there(device):
    scope = evaluation_scope(device, ORT_GPU, 5000, 500)
    assert (scope.provider, scope.images, scope.is_subset) == ("CUDAExecutionProvider", 5000, False)


def test_a_gpu_step_without_the_cuda_provider_evaluates_a_subset_and_says_how_to_get_all():
    scope = evaluation_scope("cuda:0", ORT_CPU, 5000, 500)
    assert (scope.provider, scope.images, scope.val_images, scope.is_subset) == ("CPUExecutionProvider", 500, 5000, True)
    assert "onnxruntime-gpu" in scope.reason and "QAT_ONNX_CPU_VAL_IMAGES" in scope.reason
    assert not evaluation_scope("cuda:0", ORT_CPU, 64, 500).is_subset  # a set smaller than the limit: all of it


def test_the_subset_is_the_first_images_in_the_order_ultralytics_loads_them(pretrained, tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    _, subset, _ = pretrained
    full = check_det_dataset(str(subset.dataset_yaml), autodownload=False)
    cfg = get_cfg(overrides=dict(task="detect", imgsz=64, cache=False))
    loaded = build_yolo_dataset(cfg, full["val"], 8, full, mode="val", rect=False, stride=32)
    assert val_image_files(full) == [Path(f) for f in loaded.im_files]

    yaml_path = val_subset_yaml(subset.dataset_yaml, 3, tmp_path)
    part = check_det_dataset(str(yaml_path), autodownload=False)
    assert part["names"] == full["names"] and part["train"] == full["train"]
    first = build_yolo_dataset(cfg, part["val"], 8, part, mode="val", rect=False, stride=32)
    assert first.im_files == loaded.im_files[:3]
    assert all(torch.equal(torch.as_tensor(a["cls"]), torch.as_tensor(b["cls"])) for a, b in zip(first.labels, loaded.labels[:3]))


def test_a_subset_of_symlinked_images_keeps_their_labels(pretrained, tmp_path):
    """COCO on another filesystem is linked into the subset with symlinks (core/coco.py `link_file`): the list
    must keep the subset's paths, or Ultralytics would look for labels beside COCO's own images and find none."""
    import shutil

    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    _, subset, _ = pretrained
    copy = tmp_path / "subset"
    shutil.copytree(subset.dataset_yaml.parent, copy)
    elsewhere = tmp_path / "coco_val2017"
    elsewhere.mkdir()
    for image in sorted((copy / "images" / "val").iterdir()):
        target = elsewhere / image.name
        shutil.move(image, target)
        image.symlink_to(target)
    yaml_path = copy / subset.dataset_yaml.name
    yaml_path.write_text(subset.dataset_yaml.read_text().replace(str(subset.dataset_yaml.parent), str(copy)))
    cfg = get_cfg(overrides=dict(task="detect", imgsz=64, cache=False))
    full = check_det_dataset(str(yaml_path), autodownload=False)
    loaded = build_yolo_dataset(cfg, full["val"], 8, full, mode="val", rect=False, stride=32)
    part = check_det_dataset(str(val_subset_yaml(yaml_path, 4, tmp_path / "eval")), autodownload=False)
    first = build_yolo_dataset(cfg, part["val"], 8, part, mode="val", rect=False, stride=32)
    assert first.im_files == loaded.im_files[:4] and all(Path(f).is_symlink() for f in first.im_files)
    assert sum(len(label["cls"]) for label in first.labels) == sum(len(label["cls"]) for label in loaded.labels[:4]) > 0


def test_the_export_stage_measures_both_sides_of_each_map_delta_on_the_scope(pretrained, tmp_path, monkeypatch):
    """The subset branch end to end: every mAP figure of the result (PyTorch, QCDQ, INT4, end-to-end: both sides of
    each delta) is measured on the dataset of the scope's first 3 val images, and the scope is recorded."""
    root, subset, fp = pretrained
    settings = load_settings({"profile": "smoke", "storage": str(root)})
    model, _ = load_float_model(fp["checkpoint"], fp["sha256"])
    quantize_w4a16(model, quant_options(settings))
    checkpoint = tmp_path / "qat_checkpoint.pt"
    digest = save_checkpoint(checkpoint, {"ema": model.state_dict()}, {"names": subset.class_names})
    scope = EvaluationScope("CPUExecutionProvider", 3, 8, "forced for the test")
    monkeypatch.setattr(export_stage, "evaluation_scope", lambda *args: scope)
    evaluated: list[tuple[str, Path]] = []

    def spy(kind, evaluate):
        def wrapped(model_or_path, data_yaml, **kwargs):
            evaluated.append((kind, Path(data_yaml)))
            return evaluate(model_or_path, data_yaml, **kwargs)
        return wrapped

    monkeypatch.setattr(export_stage, "evaluate_model", spy("torch", export_stage.evaluate_model))
    monkeypatch.setattr(export_stage.onnx_export, "evaluate_onnx", spy("onnx", export_stage.onnx_export.evaluate_onnx))
    result = export_stage.run_export_stage(ExportRequest(
        variant="yolo10n", method="ema", seed=0, source="qat", checkpoint=checkpoint, checkpoint_sha256=digest,
        pretrained_checkpoint=fp["checkpoint"], pretrained_sha256=fp["sha256"], dataset_yaml=subset.dataset_yaml,
        out_dir=tmp_path / "export", settings=settings,
    ), log=lambda line: None)

    eval_dir = tmp_path / "export" / "eval"
    assert sorted(kind for kind, _ in evaluated) == ["onnx", "onnx", "onnx", "torch", "torch"]  # QCDQ, INT4, e2e
    assert {path for _, path in evaluated} == {eval_dir / "dataset_val_first_3.yaml"}
    assert len((eval_dir / "val_first_3.txt").read_text().splitlines()) == 3
    assert result["evaluation_scope"] == scope.as_record()
    assert json.loads((tmp_path / "export" / "onnx_model.json").read_text())["evaluation_scope"]["images"] == 3
