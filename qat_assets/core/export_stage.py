"""The export stage of one (variant, method, seed): a W4A16 checkpoint in, deployable ONNX files out, checked.

The W4 file is exported from the QC-folded model (`source=qc`) or from a QAT checkpoint's EMA weights
(`source=qat`, for runs that never went through QC); the FP file from the variant's pretrained checkpoint.
Then onnxruntime is compared with the PyTorch fake-quant model on real val images, and the W4 file's
mAP is measured through Ultralytics' validator next to the PyTorch figure for the same weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime
import torch
from ultralytics.data.utils import check_det_dataset

from . import onnx_export
from .artifacts import load_checkpoint, read_sidecar, sha256_file, write_json_atomic
from .export_evaluation import evaluation_scope, val_image_files, val_subset_yaml
from .evaluate import evaluate_model, evaluation_settings, resolve_device
from .models import build_detection_model, load_float_model
from .qat import quant_options
from .quantize import freeze_quantized_weights, quantize_w4a16
from .requests import ExportRequest

W4_NAME = "w4a16_qcdq.onnx"
INT4_NAME = "w4a16_int4.onnx"
E2E_NAME = "w4a16_e2e.onnx"  # the one-to-one head with its top-k output, what an NMS-free deployment runs
FP_NAME = "fp32.onnx"
RESULT_NAME = "onnx_model.json"
# The goals of issue 12: onnxruntime must reproduce the PyTorch model, and its mAP the PyTorch mAP. Parity is per
# channel of the raw head outputs (issue 24), near what float32 achieves there (~1e-6 measured on yolo10n).
PARITY_GOAL_REL = 1e-5
MAP_GOAL_ABS = 0.002
# A layer "diverges" above this: inside the network a channel of small values reaches ~3e-5 by float rounding
# alone (yolo10n, random BN statistics), so the goal itself would name innocent layers.
DIVERGENCE_REL = 1e-3
# Issue 24: the INT4 file holds little beyond its parameters at their bit width (graph and names: the rest).
INT4_SIZE_GOAL_OVER_FLOOR = 1.15


def load_quantized(request: ExportRequest, names: list[str]) -> torch.nn.Module:
    """The W4A16 model to deploy, rebuilt from its state dict (QC: the folded model; QAT: the EMA weights)."""
    state = load_checkpoint(request.checkpoint, request.checkpoint_sha256)
    model = build_detection_model(request.variant, names)
    quantize_w4a16(model, quant_options(request.settings))
    model.load_state_dict(state["model"] if request.source == "qc" else state["ema"])
    return model.eval()


def goal_failures(head: dict, map_delta: dict, divergence: dict | None) -> list[str]:
    """One sentence per missed goal; the parity sentence names the worst channel and the first diverging layer."""
    failures = []
    if head["max_rel"] > PARITY_GOAL_REL:
        where = f"first diverging at {divergence['layer']} (relative {divergence['max_rel']})" if divergence else ""
        failures.append(
            f"raw head outputs differ by {head['max_rel']:.2e} relative in channel {head.get('worst_channel')} of "
            f"{head.get('worst_layer')} (goal <= {PARITY_GOAL_REL:g} per channel); {where}"
        )
    for key, delta in map_delta.items():
        if abs(delta) > MAP_GOAL_ABS:
            where = (
                f"first layer over {DIVERGENCE_REL:g}: {divergence['layer']}" if divergence
                else f"no layer differs by more than {DIVERGENCE_REL:g}, so the gap comes after the head (top-k, evaluation)"
            )
            failures.append(f"ONNX {key} differs from PyTorch by {delta:+.4f} (goal within {MAP_GOAL_ABS}); {where}")
    return failures


def export_int4(qcdq_graph, destination, images: torch.Tensor) -> dict:
    """The INT4-storage variant of the QCDQ file, its size against the floor of its parameters, and how far its
    onnxruntime outputs are from the QCDQ file's."""
    int4_graph = onnx_export.int4_storage(qcdq_graph)
    path = onnx_export.save_graph(destination, int4_graph)
    feed = {onnx_export.INPUT_NAME: images.numpy()}
    (qcdq,) = onnx_export.runtime_session(qcdq_graph).run([onnx_export.OUTPUT_NAME], feed)
    (packed,) = onnx_export.runtime_session(path).run([onnx_export.OUTPUT_NAME], feed)
    return {
        "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), "opset": onnx_export.INT4_OPSET,
        "floor_bytes": onnx_export.storage_floor_bytes(int4_graph),
        "weight_tensors": onnx_export.precision_counts(onnx_export.conv_weight_precisions(onnx.load(str(path)))),
        "max_rel_vs_qcdq": onnx_export.channel_relative_difference(qcdq, packed)[0],
    }


def export_end2end(
    model: torch.nn.Module, destination: Path, images: torch.Tensor, *, int4: bool, dataset_yaml: Path,
    shape: dict, common: dict,
) -> dict:
    """The end-to-end W4 file (YOLOv10's one-to-one head and its top-k, Ultralytics' `nms=False`), INT4-stored
    unless INT4 is off, its per-channel parity with PyTorch, and both sides' mAP of the one-to-one head."""
    path = onnx_export.export_quantized(model, destination, end2end=True, **shape)
    graph = onnx.load(str(path))
    if int4:
        graph = onnx_export.int4_storage(graph)
        onnx_export.save_graph(path, graph)
    layers = onnx_export.layer_parity(model, graph, images, shape["max_det"], end2end=True)
    (detections,) = onnx_export.runtime_session(path).run(None, {onnx_export.INPUT_NAME: images.numpy()})
    torch_metrics = evaluate_model(freeze_quantized_weights(model), dataset_yaml, nms=False, **common)
    onnx_metrics = onnx_export.evaluate_onnx(path, dataset_yaml, end2end=True, **common)
    return {
        "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path),
        "format": "INT4 storage (opset 21)" if int4 else "QCDQ", "output_shape": list(detections.shape),
        "parity": onnx_export.head_parity(layers), "first_divergence": onnx_export.first_divergence(layers, DIVERGENCE_REL),
        "torch_metrics": torch_metrics, "onnx_metrics": onnx_metrics,
        "map_delta": {key: onnx_metrics[key] - torch_metrics[key] for key in ("map50_95", "map50")},
    }


def run_export_stage(request: ExportRequest, log: Callable[[str], None]) -> dict:
    settings = request.settings
    label = f"{request.variant} {request.method}|{request.seed}"
    started = time.time()
    source_sidecar = read_sidecar(request.checkpoint)
    if source_sidecar.get("skipped"):
        reason = f"the {request.source} checkpoint was skipped: {source_sidecar['skipped']}"
        log(f"{label}: export skipped: {reason}")
        return {"skipped": reason}
    model = load_quantized(request, source_sidecar["names"])
    fp_model, _ = load_float_model(request.pretrained_checkpoint, request.pretrained_sha256)
    out = request.out_dir
    max_det = evaluation_settings(settings.imgsz, settings.batch)["max_det"]
    shape = dict(imgsz=settings.imgsz, opset=settings.onnx_opset, max_det=max_det)

    log(f"{label}: exporting W4A16 QCDQ ONNX (Brevitas, opset {settings.onnx_opset}) from the {request.source} checkpoint")
    w4_path = onnx_export.export_quantized(model, out / W4_NAME, **shape)
    log(f"{label}: exporting the FP reference ONNX")
    fp_path = onnx_export.export_float(fp_model.eval(), out / FP_NAME, **shape)
    graph = onnx.load(str(w4_path))
    precisions = onnx_export.conv_weight_precisions(graph)

    images = onnx_export.val_images(request.dataset_yaml, settings.imgsz, settings.onnx_parity_images)
    layers = onnx_export.layer_parity(model, graph, images, max_det)
    head = onnx_export.head_parity(layers)
    divergence = onnx_export.first_divergence(layers, DIVERGENCE_REL)
    log(f"{label}: onnxruntime vs PyTorch on {len(images)} val images: raw head max abs {head['max_abs']:.3e}, "
        f"worst channel {head['max_rel']:.3e} relative (channel {head['worst_channel']} of {head['worst_layer']})")

    # The mAP passes run on the step's device (at COCO, 5,000 images at 640 px per pass): PyTorch where the model
    # trained, the files through onnxruntime's CUDA provider when onnxruntime-gpu is installed, else on a val
    # subset (core/export_evaluation.py). The exact check is the per-channel parity above.
    device = resolve_device(settings.device)
    scope = evaluation_scope(device, onnxruntime.get_available_providers(),
                             len(val_image_files(check_det_dataset(str(request.dataset_yaml), autodownload=False))),
                             settings.onnx_cpu_val_images)
    eval_yaml = val_subset_yaml(request.dataset_yaml, scope.images, out / "eval") if scope.is_subset else request.dataset_yaml
    log(f"{label}: mAP of the files on {scope.images} val images with {scope.provider}: {scope.reason}")
    common = dict(imgsz=settings.imgsz, batch=settings.batch, device=device, workers=settings.workers, work_dir=out / "eval")
    torch_metrics = evaluate_model(freeze_quantized_weights(model), eval_yaml, **common)
    onnx_metrics = onnx_export.evaluate_onnx(w4_path, eval_yaml, **common)
    map_delta = {key: onnx_metrics[key] - torch_metrics[key] for key in ("map50_95", "map50")}
    log(f"{label}: mAP50-95 onnxruntime {onnx_metrics['map50_95']:.4f} vs PyTorch {torch_metrics['map50_95']:.4f}; "
        f"mAP50 {onnx_metrics['map50']:.4f} vs {torch_metrics['map50']:.4f}")
    failures = goal_failures(head, map_delta, divergence)
    int4 = export_int4(graph, out / INT4_NAME, images) if settings.onnx_int4 else None
    if int4 is not None:
        int4["onnx_metrics"] = onnx_export.evaluate_onnx(Path(int4["path"]), eval_yaml, **common)
        int4["map50_95_delta"] = int4["onnx_metrics"]["map50_95"] - torch_metrics["map50_95"]
        log(f"{label}: INT4 file mAP50-95 onnxruntime {int4['onnx_metrics']['map50_95']:.4f}")
        if abs(int4["map50_95_delta"]) > MAP_GOAL_ABS:
            failures.append(f"INT4 file map50_95 differs from PyTorch by {int4['map50_95_delta']:+.4f} (goal within {MAP_GOAL_ABS})")
        log(f"{label}: INT4-storage file {int4['bytes'] / 1e6:.2f} MB (floor {int4['floor_bytes'] / 1e6:.2f} MB), outputs vs QCDQ file: max rel {int4['max_rel_vs_qcdq']:.1e}")
        if int4["max_rel_vs_qcdq"] > PARITY_GOAL_REL:
            failures.append(f"the INT4-storage file differs from the QCDQ file by {int4['max_rel_vs_qcdq']:.2e} relative")
        if int4["bytes"] > INT4_SIZE_GOAL_OVER_FLOOR * int4["floor_bytes"]:
            failures.append(f"the INT4 file is {int4['bytes'] / int4['floor_bytes']:.2f}x the floor of its parameters "
                            f"({int4['floor_bytes'] / 1e6:.2f} MB; goal <= {INT4_SIZE_GOAL_OVER_FLOOR}x)")

    log(f"{label}: exporting the end-to-end W4 file (one-to-one head, top-k output) and measuring its head")
    e2e = export_end2end(model, out / E2E_NAME, images, int4=settings.onnx_int4, dataset_yaml=eval_yaml,
                         shape=shape, common=common)
    log(f"{label}: one-to-one head mAP50-95 onnxruntime {e2e['onnx_metrics']['map50_95']:.4f} vs PyTorch "
        f"{e2e['torch_metrics']['map50_95']:.4f}; output {e2e['output_shape']}")
    failures += [f"end-to-end file: {failure}" for failure in goal_failures(e2e["parity"], e2e["map_delta"], e2e["first_divergence"])]

    result = {
        "variant": request.variant, "method": request.method, "seed": request.seed, "source": request.source,
        "source_checkpoint": str(request.checkpoint), "source_sha256": request.checkpoint_sha256,
        "w4_onnx": str(w4_path), "w4_bytes": w4_path.stat().st_size, "w4_sha256": sha256_file(w4_path),
        "fp_onnx": str(fp_path), "fp_bytes": fp_path.stat().st_size, "fp_sha256": sha256_file(fp_path),
        "opset": settings.onnx_opset, "int4": int4, "end2end": e2e, "format": "QCDQ (int8 initializer, Clip to the bit width's range, DequantizeLinear)",
        "weight_tensors": onnx_export.precision_counts(precisions), "conv_weights": precisions,
        "op_counts": onnx_export.op_counts(graph),
        "runtime": onnx_export.runtime_info(onnx_export.runtime_session(w4_path)),
        "parity_images": len(images), "parity": head, "layer_parity": layers,
        "first_divergence": divergence, "onnx_metrics": onnx_metrics, "torch_metrics": torch_metrics,
        "map_delta": map_delta, "evaluation_scope": scope.as_record(), "goals": {"parity_max_rel_per_channel": PARITY_GOAL_REL, "divergence_rel": DIVERGENCE_REL,
                                        "map_abs": MAP_GOAL_ABS, "int4_size_over_floor": INT4_SIZE_GOAL_OVER_FLOOR},
        "failures": failures, "evaluation": evaluation_settings(settings.imgsz, settings.batch),
        "settings": settings.model_dump(mode="json"), "seconds": time.time() - started,
    }
    write_json_atomic(out / RESULT_NAME, result)
    return result
