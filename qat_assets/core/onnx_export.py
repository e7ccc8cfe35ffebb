"""ONNX export of a W4A16 YOLOv10 and its checks in onnxruntime.

The quantized model goes through Brevitas' own QCDQ exporter (`brevitas.export.export_onnx_qcdq`): every
quantized conv weight is stored as an int8 initializer followed by Clip (to the bit width's integer range,
[-7, 7] for narrow-range 4 bit) and a per-output-channel DequantizeLinear, the form ONNX runtimes and
vendor compilers recognise as a quantized weight. The float reference goes through torch's ONNX exporter.
Both graphs end the way Ultralytics 8.4's own ONNX export of a YOLOv10 ends (default `nms=None`): the head
that every PyTorch figure of this project is measured with (the one-to-many branch, decoded boxes and class
scores, output (batch, 4 + classes, anchors)), with Ultralytics' validator doing the NMS outside the graph,
exactly as for PyTorch. Batch and image size are dynamic, and Ultralytics' metadata is written, so
Ultralytics' AutoBackend (and its validator) run the file like any exported model.

Checks use onnxruntime, never an interpreter of our own: raw head outputs (the undecoded box and class
output convs) and every top-level layer's output are exposed as extra graph outputs of an in-memory copy
and compared with the PyTorch fake-quant model on real val images.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from torch import nn

from .artifacts import atomic_path
from .bn_fold import fold_batchnorms

INPUT_NAME = "images"
OUTPUT_NAME = "output0"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}}


def deployable_copy(model: nn.Module, max_det: int, end2end: bool = False) -> nn.Module:
    """Eval-mode copy set up like Ultralytics' exporter does for ONNX, every BatchNorm folded into its conv
    (integer codes kept, `bn_fold`).

    end2end=False: the one-to-many head, decoded boxes and scores for an external NMS (Ultralytics' default,
    `nms=None`, and the head every PyTorch figure of this project is measured with). end2end=True: YOLOv10's
    one-to-one head and its top-k, output (batch, max_det, 6) = x1, y1, x2, y2, score, class (`nms=False`).
    """
    model = copy.deepcopy(model).float().eval()
    head = model.model[-1]
    if end2end and getattr(head, "one2one_cv2", None) is None:
        raise ValueError(f"{type(head).__name__} has no one-to-one branch; export it with end2end=False")
    head.end2end = end2end
    head.fuse()  # drops the branch that is not used
    head.export, head.format, head.dynamic, head.max_det = True, "onnx", True, max_det
    fold_batchnorms(model)
    return model


def ultralytics_metadata(model: nn.Module, imgsz: int, description: str, end2end: bool = False) -> dict[str, str]:
    """The metadata Ultralytics' exporter writes, so AutoBackend knows stride, classes, head and dynamic shapes."""
    from ultralytics import __version__

    return {
        "description": description, "author": "qat_assets", "version": __version__, "task": "detect",
        "stride": str(int(max(model.stride))), "batch": "1", "imgsz": str([imgsz, imgsz]),
        "names": str(dict(model.names)), "args": str({"dynamic": True, "nms": False if end2end else None}),
        "channels": "3", "end2end": str(end2end), "head": type(model.model[-1]).__name__,
    }


def dynamic_topk(graph_model: onnx.ModelProto, max_det: int) -> onnx.ModelProto:
    """The end-to-end graph with its top-k count computed per input, min(max_det, anchors), as PyTorch does.

    Ultralytics' head takes `k = min(max_det, anchors)` in Python, so tracing bakes the export size's k into
    both TopK nodes (anchors first, then anchor x class); a smaller image (a rectangular validation batch, an
    edge camera's 320 px) then has fewer anchors than k and onnxruntime refuses the TopK. Here both take k
    from the first TopK's input shape. Returns a new model.
    """
    model = copy.deepcopy(graph_model)
    graph = model.graph
    topks = [node for node in graph.node if node.op_type == "TopK"]
    if len(topks) != 2:
        raise ValueError(f"expected the one-to-one head's two TopK nodes, found {len(topks)}; was this exported with end2end=True?")
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([max_det], np.int64), "max_det"))
    anchors = "topk_anchors"
    nodes = [
        onnx.helper.make_node("Shape", [topks[0].input[0]], [anchors], name="/topk_k/Shape", start=1, end=2),
        onnx.helper.make_node("Min", [anchors, "max_det"], ["topk_k"], name="/topk_k/Min"),
    ]
    first = list(graph.node).index(topks[0])
    for offset, node in enumerate(nodes):
        graph.node.insert(first + offset, node)
    for node in topks:
        node.input[1] = "topk_k"
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    return model


def _write_with_metadata(destination: Path, graph: onnx.ModelProto, metadata: dict[str, str]) -> None:
    onnx.helper.set_model_props(graph, metadata)
    save_graph(destination, graph)


@contextmanager
def exporter_output(destination: Path) -> Iterator[Path]:
    """A scratch file beside `destination` for an exporter to write to, removed afterwards."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".export-") as scratch:
        yield Path(scratch) / destination.name


def export_quantized(
    model: nn.Module, destination: Path, *, imgsz: int, opset: int, max_det: int, end2end: bool = False
) -> Path:
    """QCDQ ONNX of a model holding Brevitas QuantConv2d layers, through Brevitas' exporter (head: `deployable_copy`)."""
    from brevitas.export import export_onnx_qcdq

    deployable = deployable_copy(model, max_det, end2end)
    with exporter_output(destination) as raw:
        export_onnx_qcdq(
            deployable, args=torch.zeros(1, 3, imgsz, imgsz), export_path=str(raw), opset_version=opset,
            dynamo=False,  # the TorchScript path keeps module scopes in node names (layer-by-layer parity)
            keep_initializers_as_inputs=False, do_constant_folding=True, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES,
        )
        graph = onnx.load(str(raw))
    if end2end:
        graph = dynamic_topk(graph, max_det)
    description = "W4A16 QCDQ (Brevitas), " + ("one-to-one head, top-k output" if end2end else "one-to-many head")
    _write_with_metadata(destination, graph, ultralytics_metadata(model, imgsz, description, end2end))
    return destination


def export_float(model: nn.Module, destination: Path, *, imgsz: int, opset: int, max_det: int) -> Path:
    """Plain ONNX of the floating-point model (the reference), through torch's exporter."""
    deployable = deployable_copy(model, max_det)
    with exporter_output(destination) as raw:
        torch.onnx.export(
            deployable, (torch.zeros(1, 3, imgsz, imgsz),), str(raw), opset_version=opset, dynamo=False,
            do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES,
        )
        graph = onnx.load(str(raw))
    _write_with_metadata(destination, graph, ultralytics_metadata(model, imgsz, "float reference"))
    return destination


INT4_OPSET = 21  # first opset whose DequantizeLinear takes INT4 inputs
WEIGHT_BITS_KEY = "weight_bits"  # metadata: {conv node: {"bits", "low", "high"}} of its integer weight codes


def int4_storage(graph_model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with integer weights stored at their bit width and nothing else around them (opset 21).

    Brevitas' QCDQ exporter stores 4-bit weights in int8, behind a Clip to [-7, 7] and a DequantizeLinear with an
    all-zero zero point. Here every weight whose stored codes are already inside its Clip range loses the Clip
    (it changes nothing) and the zero point (0 is DequantizeLinear's default); 4-bit codes are packed two per
    byte as INT4 `raw_data` (onnx's `numpy_helper.from_array` of an `ml_dtypes.int4` array does the packing
    the spec defines). The bit width and declared range of each layer, which the Clips carried, go to the model
    metadata (`WEIGHT_BITS_KEY`). Neither Brevitas nor onnx ships this repacking (onnxruntime's quantizers start from
    float models), so it is done here on the exported graph: same integers, same scales.
    """
    import ml_dtypes
    from onnx import version_converter

    model = version_converter.convert_version(graph_model, INT4_OPSET)
    graph = model.graph
    constants = _constants(graph)
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped, ranges = [], {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        clip = producer.get(node.input[0])
        if clip is None or clip.op_type != "Clip" or clip.input[0] not in constants:
            continue
        low, high = (int(constants[name]) for name in clip.input[1:3])
        codes = constants[clip.input[0]]
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        if codes.min() < low or codes.max() > high or (zero_point is not None and zero_point.any()):
            continue  # the Clip or the zero point does something here: keep the QCDQ form
        convs = [c for c in consumers.get(node.output[0], []) if c.op_type == "Conv"]
        stored = (convs[0].name.strip("/").replace("/", ".") if convs else clip.input[0]) + "_codes"
        dtype = ml_dtypes.int4 if integer_range_bits(low, high) <= 4 else np.int8
        graph.initializer.append(onnx.numpy_helper.from_array(codes.astype(dtype), stored))
        node.input[0] = stored
        del node.input[2:]
        dropped.append(clip)
        for conv in convs:
            ranges[conv.name] = {"bits": integer_range_bits(low, high), "low": low, "high": high}
    for clip in dropped:
        graph.node.remove(clip)
    # Intermediate shapes are an exporter's annotation, not part of the network (~4 % of a yolov10n INT4 file);
    # runtimes infer them on load.
    del graph.value_info[:]
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, WEIGHT_BITS_KEY: json.dumps(ranges)}
    )
    return model


def storage_floor_bytes(graph_model: onnx.ModelProto) -> int:
    """Bytes the conv parameters need at their precision: codes at their bit width (float weights at 32 bit), and
    one float32 scale per quantized output channel and one float32 bias per channel, and the four float32
    parameters per channel of every BatchNormalization left in the graph (a conv with one per-tensor scale
    keeps its BN: core/bn_fold.py). A file cannot be smaller than this without compressing; what it holds
    above it is graph structure, names and metadata."""
    shapes = {init.name: int(np.prod(init.dims)) for init in graph_model.graph.initializer}
    producer = {output: node for node in graph_model.graph.node for output in node.output}
    precision = {row["conv"]: row["bits"] for row in conv_weight_precisions(graph_model)}
    total_bits = 0
    for node in graph_model.graph.node:
        if node.op_type == "BatchNormalization":
            total_bits += 32 * sum(shapes.get(name, 0) for name in node.input[1:5])
        if node.op_type != "Conv":
            continue
        weight, dequantize = node.input[1], producer.get(node.input[1])
        bits = precision[node.name]
        if bits is None:
            total_bits += 32 * shapes.get(weight, 0)
        else:
            source = producer.get(dequantize.input[0])
            codes = source.input[0] if source is not None else dequantize.input[0]
            total_bits += bits * shapes[codes] + 32 * shapes[dequantize.input[1]]
        if len(node.input) > 2:
            total_bits += 32 * shapes.get(node.input[2], 0)
    return total_bits // 8


def save_graph(destination: Path, graph_model: onnx.ModelProto) -> Path:
    """Check the graph against the ONNX spec, then write it atomically."""
    onnx.checker.check_model(graph_model)
    with atomic_path(destination) as tmp:
        onnx.save(graph_model, str(tmp))
    return destination


# --- what the graph holds ----------------------------------------------------------------------------


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}


def integer_range_bits(low: int, high: int) -> int:
    """Bits of a signed integer range: [-7, 7] or [-8, 7] -> 4, [-127, 127] or [-128, 127] -> 8."""
    return int(np.ceil(np.log2(max(-low, high + 1)))) + 1


STORED_RANGES = {
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
}


def conv_weight_precisions(graph_model: onnx.ModelProto) -> list[dict[str, Any]]:
    """For each Conv: its name and how its weight is stored (bits of the integer range, or float).

    The range is the Clip's in a QCDQ file; without a Clip, the one recorded in the metadata by `int4_storage`,
    else the full range of the stored integer type."""
    graph = graph_model.graph
    constants = _constants(graph)
    recorded = json.loads({p.key: p.value for p in graph_model.metadata_props}.get(WEIGHT_BITS_KEY, "{}"))
    producer = {output: node for node in graph.node for output in node.output}
    stored_types = {init.name: init.data_type for init in graph.initializer}
    rows = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        source = producer.get(node.input[1])
        row = {"conv": node.name, "weight": "float", "bits": None, "low": None, "high": None}
        if source is not None and source.op_type == "DequantizeLinear":
            stored = producer.get(source.input[0])
            if stored is not None and stored.op_type == "Clip":
                low, high = (int(constants[name]) for name in stored.input[1:3])
            elif node.name in recorded:
                low, high = recorded[node.name]["low"], recorded[node.name]["high"]
            else:  # no Clip, no record: the full range of the stored integer type (an int8 or INT4 initializer)
                low, high = STORED_RANGES[stored_types.get(source.input[0], onnx.TensorProto.INT8)]
            row.update(weight="integer", bits=integer_range_bits(low, high), low=low, high=high)
        rows.append(row)
    return rows


def precision_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """{"int4": n, "int8": n, "float": n} over conv weight tensors."""
    counts = {"int4": 0, "int8": 0, "float": 0}
    for row in rows:
        key = "float" if row["bits"] is None else f"int{row['bits']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def op_counts(graph_model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph_model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# --- onnxruntime ---------------------------------------------------------------------------------------


def runtime_session(model: onnx.ModelProto | Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the exporter's harmless warnings would flood the log
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def runtime_info(session) -> dict[str, Any]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "providers": session.get_providers()}


def _scope_outputs(graph: onnx.GraphProto, scope: str) -> list[str]:
    """Tensors made inside a module scope (node names like `/model.4/...`) and used outside it."""
    inside = [node for node in graph.node if node.name.startswith(scope)]
    made = [output for node in inside for output in node.output]
    used_outside = {name for node in graph.node if not node.name.startswith(scope) for name in node.input}
    return [name for name in made if name in used_outside]


def probe_points(graph_model: onnx.ModelProto, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(label, ONNX tensor, PyTorch module) for every top-level layer output and every raw head output conv."""
    graph = graph_model.graph
    points = []
    layers = model.model
    for index, layer in enumerate(layers[:-1]):
        outputs = _scope_outputs(graph, f"/model.{index}/")
        if outputs:
            points.append((f"model.{index} ({type(layer).__name__})", outputs[-1], layer))
    head_index = len(layers) - 1
    head = layers[-1]
    for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):  # deployable_copy keeps one of the two pairs
        for level, seq in enumerate(getattr(head, branch, None) or ()):
            scope = f"/model.{head_index}/{branch}.{level}/{branch}.{level}.{len(seq) - 1}/"
            convs = [node.output[0] for node in graph.node if node.name.startswith(scope) and node.op_type == "Conv"]
            if convs:
                points.append((f"model.{head_index}.{branch}.{level} (head output)", convs[-1], seq[-1]))
    return points


def channel_relative_difference(reference: np.ndarray, other: np.ndarray) -> tuple[float, int]:
    """Worst channel (axis 1) of max |a - b| / max |a|, and which channel: a whole-tensor maximum hides an error
    in a low-magnitude channel behind the largest channel's values."""
    channels = reference.shape[1]
    a = np.moveaxis(reference, 1, 0).reshape(channels, -1)
    b = np.moveaxis(other, 1, 0).reshape(channels, -1)
    per_channel = np.abs(a - b).max(axis=1) / np.maximum(np.abs(a).max(axis=1), 1e-12)
    worst = int(per_channel.argmax())
    return float(per_channel[worst]), worst


@torch.no_grad()
def layer_parity(
    model: nn.Module, graph_model: onnx.ModelProto, images: torch.Tensor, max_det: int, end2end: bool = False
) -> list[dict]:
    """PyTorch vs onnxruntime at every probe point, in graph order; `model` is what was exported.

    Each row's `max_rel` is its worst channel's (`channel_relative_difference`), `channel` says which. PyTorch's
    side runs on the CPU in float32, where no TF32 or reduced-precision kernel can stand in for the exact
    product a 1e-5 goal compares against (on a GPU, TF32 convs alone differ by ~1e-3).
    """
    deployable = deployable_copy(model, max_det, end2end).cpu()
    images = images.cpu()
    probed = copy.deepcopy(graph_model)
    points = probe_points(probed, deployable)
    existing = {output.name for output in probed.graph.output}
    for _, tensor, _ in points:
        if tensor not in existing:
            probed.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, key=id(module): captured.__setitem__(key, o))
        for _, _, module in points
    ]
    try:
        final = deployable(images)
    finally:
        for hook in hooks:
            hook.remove()
    session = runtime_session(probed)
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(None, {INPUT_NAME: images.numpy()})))
    rows = []
    for label, tensor, module in points:
        reference = captured[id(module)].numpy()
        got = values[tensor]
        if reference.shape != got.shape:  # an unexpected scope layout; say so rather than guess
            rows.append({"layer": label, "tensor": tensor, "max_abs": None, "max_rel": None, "channel": None,
                         "note": f"shape {got.shape} vs {reference.shape}"})
            continue
        rows.append(_parity_row(label, tensor, reference, got))
    if not end2end:  # the top-k's order of near-equal scores is not a parity question; mAP covers what follows it
        rows.append(_parity_row("output0 (decoded boxes and scores)", OUTPUT_NAME, final.numpy(), values[OUTPUT_NAME]))
    return rows


def _parity_row(label: str, tensor: str, reference: np.ndarray, got: np.ndarray) -> dict:
    max_rel, channel = channel_relative_difference(reference, got)
    return {"layer": label, "tensor": tensor, "max_abs": float(np.abs(reference - got).max()), "max_rel": max_rel,
            "channel": channel, "note": ""}


def head_parity(rows: list[dict]) -> dict[str, Any]:
    """Worst difference over the raw head outputs (the box and class output convs), and where it is."""
    head = [row for row in rows if "head output" in row["layer"] and row["max_rel"] is not None]
    if not head:
        raise ValueError("no raw head output was found in the exported graph; the parity check cannot run")
    worst = max(head, key=lambda r: r["max_rel"])
    return {"max_abs": max(r["max_abs"] for r in head), "max_rel": worst["max_rel"],
            "worst_layer": worst["layer"], "worst_channel": worst["channel"]}


def first_divergence(rows: list[dict], tolerance: float) -> dict | None:
    """The first layer (graph order) whose relative difference exceeds `tolerance`, or None."""
    for row in rows:
        if row["max_rel"] is None or row["max_rel"] > tolerance:
            return row
    return None


def val_images(data_yaml: Path, imgsz: int, count: int) -> torch.Tensor:
    """The first `count` val images, letterboxed to `imgsz` by Ultralytics' val pipeline, as [0, 1] floats."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml), autodownload=False)
    cfg = get_cfg(overrides=dict(task="detect", imgsz=imgsz, cache=False))
    dataset = build_yolo_dataset(cfg, data["val"], count, data, mode="val", rect=False, stride=32)
    images = [dataset[i]["img"] for i in range(min(count, len(dataset)))]
    return torch.stack(images).float() / 255


def evaluate_onnx(
    path: Path, data_yaml: Path, *, imgsz: int, batch: int, device: str, workers: int, work_dir: Path,
    end2end: bool = False,
) -> dict[str, float]:
    """mAP of an exported file through Ultralytics' validator and its AutoBackend onnxruntime path; an end-to-end
    file's top-k output is read as final detections (`nms=False`), the other file's goes through NMS.

    Same settings as every other figure (`evaluation_settings`); the file is dynamic, so AutoBackend keeps the
    rectangular batches and the batch size instead of falling back to batch 1 at a fixed shape.
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    from .evaluate import metrics_from_ultralytics, validator_arguments

    os.environ.setdefault("YOLO_OFFLINE", "1")
    validator = DetectionValidator(
        args=dict(
            model=str(path), data=str(data_yaml), device=device, plots=False, save_json=False, verbose=False,
            project=str(work_dir), name="val", exist_ok=True, workers=workers, nms=False if end2end else None,
            **validator_arguments(imgsz, batch),
        )
    )
    results = validator()
    if not validator.args.rect or validator.args.batch != 2 * batch:
        raise RuntimeError(
            f"Ultralytics' validator changed the evaluation settings for {path.name} (rect={validator.args.rect}, "
            f"batch={validator.args.batch}); the ONNX figure would not be comparable"
        )
    return metrics_from_ultralytics(results)
