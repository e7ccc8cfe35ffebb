"""`{v}/onnx_model` end to end at the smoke profile, and release-format (Ultralytics-trained) checkpoints."""

import shutil

import onnx
import pytest
import torch

from qat_assets.core import layout
from qat_assets.core.coco import SubsetResult
from qat_assets.core.evaluate import validator_arguments
from qat_assets.core.onnx_export import conv_weight_precisions, runtime_session
from qat_assets.core.settings import load_settings
from qat_assets_tests.dagster_harness import latest_metadata, run_assets, step_failure_messages


def test_onnx_model_materializes_with_a_4bit_qcdq_file_and_parity_figures(storage, instance):
    assert run_assets(instance, ["coco_subset", "calibration_subset", "yolo10n/pretrained_checkpoint"]).success
    result = run_assets(instance, ["yolo10n/qat_checkpoint", "yolo10n/qc_checkpoint", "yolo10n/onnx_model"], "ema|0")
    assert result.success, step_failure_messages(result)

    meta = latest_metadata(instance, "yolo10n/onnx_model", "ema|0")
    assert meta["source"] == "qc" and meta["opset"] == 17
    assert meta["parity_max_rel"] <= 1e-5 and meta["parity_max_abs"] >= 0  # worst channel of the raw head outputs
    assert abs(meta["map50_95_delta"]) <= 0.002 and meta["onnxruntime"] and "CPUExecutionProvider" in meta["providers"]
    assert meta["weight_tensors"]["int4"] > 50 and meta["weight_tensors"]["float"] == 1
    assert meta["w4_bytes"] < 0.5 * meta["fp_bytes"] and meta["int4_bytes"] < meta["w4_bytes"]
    assert meta["int4_max_rel_vs_qcdq"] <= 1e-6
    assert abs(meta["int4_onnx_map50_95"] - meta["torch_map50_95"]) <= 0.002
    assert meta["e2e_output_shape"][2] == 6 and meta["e2e_parity_max_rel"] <= 1e-5
    assert abs(meta["e2e_onnx_map50_95"] - meta["e2e_torch_map50_95"]) <= 0.002
    assert meta["int4_floor_bytes"] < meta["int4_bytes"] <= 1.15 * meta["int4_floor_bytes"]
    # A CPU step measures every mAP figure on the whole val set (the smoke profile's 8 images).
    assert (meta["onnx_eval_provider"], meta["onnx_eval_images"]) == ("CPUExecutionProvider", 8)

    w4 = meta["w4_onnx"]
    runtime_session(w4)  # loads in onnxruntime
    graph = onnx.load(w4)
    ops = {node.op_type for node in graph.graph.node}
    assert {"DequantizeLinear", "Clip"} <= ops
    four_bit = [r for r in conv_weight_precisions(graph) if r["bits"] == 4]
    assert four_bit and all((r["low"], r["high"]) == (-7, 7) for r in four_bit)

    (check,) = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert check.event_specific_data.passed


def test_an_ultralytics_trained_yolov10n_starts_the_chain_unchanged(storage, instance, tmp_path, monkeypatch):
    """A `yolov10n.pt` written by Ultralytics' own trainer: used with 0 fine-tune epochs, FP figure = YOLO().val()."""
    from ultralytics import YOLO

    assert run_assets(instance, ["coco_subset"]).success
    settings = load_settings()
    subset = SubsetResult.read(layout.subset_dir(storage))
    YOLO("yolov10n.yaml").train(
        data=str(subset.dataset_yaml), epochs=3, imgsz=settings.imgsz, batch=settings.batch, workers=0,
        device="cpu", amp=False, plots=False, val=False, project=str(tmp_path / "train"), name="run", exist_ok=True,
    )
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tmp_path / "train" / "run" / "weights" / "last.pt", weights / "yolov10n.pt")
    monkeypatch.setenv("QAT_CHECKPOINT_DIR", str(weights))

    assert run_assets(instance, ["yolo10n/pretrained_checkpoint"]).success
    meta = latest_metadata(instance, "yolo10n/pretrained_checkpoint")
    assert meta["source"] == f"user-checkpoint:{weights / 'yolov10n.pt'}"
    assert meta["epochs_trained"] == 0 and meta["head"]["head"] == "kept"
    # The chain starts from exactly the trainer's weights (so the figures below compare like with like).
    ours = torch.load(layout.pretrained_dir(storage, "yolo10n") / "pretrained.pt", weights_only=True)["model"]
    theirs = YOLO(str(weights / "yolov10n.pt")).model.float().state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    reference = YOLO(str(weights / "yolov10n.pt")).val(
        data=str(subset.dataset_yaml), device="cpu", workers=0, plots=False, verbose=False,
        project=str(tmp_path / "val"), **validator_arguments(settings.imgsz, settings.batch),
    )
    assert meta["mAP50-95(B)"] == pytest.approx(reference.box.map, abs=1e-6)
    assert meta["mAP50(B)"] == pytest.approx(reference.box.map50, abs=1e-6)
    assert meta["precision(B)"] == pytest.approx(reference.box.mp, abs=1e-6)
    print(f"release checkpoint: ours mAP50-95 {meta['mAP50-95(B)']:.4f}, YOLO().val {reference.box.map:.4f}")
