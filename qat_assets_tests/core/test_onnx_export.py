"""W4A16 QCDQ export through Brevitas, checked in onnxruntime (tiny untrained yolo10n, 64 px)."""

import numpy as np
import onnx
import pytest
import torch

from qat_assets.core import onnx_export
from qat_assets.core.models import build_detection_model
from qat_assets.core.quantize import QuantOptions, quantize_w4a16

IMGSZ = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detection_model("yolo10n", ["a", "b", "c"])
    for bn in model.modules():  # BN statistics as after training (fresh BNs are identities), so the fold is exercised
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.weight.data, bn.bias.data = 1 + 0.3 * torch.randn(n), 0.1 * torch.randn(n)
            bn.running_mean, bn.running_var = 0.1 * torch.randn(n), torch.rand(n) + 0.5
    quantize_w4a16(model, QuantOptions())
    path = onnx_export.export_quantized(model.eval(), tmp_path_factory.mktemp("onnx") / "w4.onnx", imgsz=IMGSZ, opset=17, max_det=300)
    return model, path, onnx.load(str(path))


def test_integer_range_bits():
    assert onnx_export.integer_range_bits(-7, 7) == 4
    assert onnx_export.integer_range_bits(-8, 7) == 4
    assert onnx_export.integer_range_bits(-127, 127) == 8
    assert onnx_export.integer_range_bits(-128, 127) == 8


def test_w4_file_holds_4bit_qcdq_weights_and_runs_in_onnxruntime(exported):
    model, path, graph = exported
    rows = onnx_export.conv_weight_precisions(graph)
    counts = onnx_export.precision_counts(rows)
    # The transform's plan: first conv and the 6 head output convs at 8 bit, the DFL conv in float.
    assert counts == {"int4": sum(r["bits"] == 4 for r in rows), "int8": 7, "float": 1}
    assert counts["int4"] > 50
    assert {(r["low"], r["high"]) for r in rows if r["bits"] == 4} == {(-7, 7)}
    ops = onnx_export.op_counts(graph)
    assert ops["DequantizeLinear"] == ops["Clip"] == counts["int4"] + counts["int8"]
    assert "BatchNormalization" not in ops  # folded into the per-channel scales and biases before export
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert metadata["end2end"] == "False" and metadata["stride"] == "32"
    session = onnx_export.runtime_session(path)
    # Dynamic batch and shape: a rectangular batch of 3, as Ultralytics' rect validation feeds it.
    (output,) = session.run(None, {"images": np.random.rand(3, 3, 96, 64).astype(np.float32)})
    assert output.shape == (3, 4 + 3, 12 * 8 + 6 * 4 + 3 * 2)  # boxes + classes, anchors at strides 8/16/32


def test_parity_is_tight_and_an_injected_error_is_located(exported):
    model, _, graph = exported
    images = torch.rand(2, 3, IMGSZ, IMGSZ)
    rows = onnx_export.layer_parity(model, graph, images, max_det=300)
    head = onnx_export.head_parity(rows)
    assert head["max_rel"] < 1e-5 and head["worst_layer"].startswith("model.23.") and head["worst_channel"] >= 0
    assert onnx_export.first_divergence(rows, 1e-3) is None
    assert any(r["layer"].startswith("model.22") for r in rows)  # every backbone/neck layer is probed

    # Flip the integer weights of one conv in layer 6: parity must break, and first at layer 6.
    broken = onnx.ModelProto()
    broken.CopyFrom(graph)
    conv = next(n for n in broken.graph.node if n.name.startswith("/model.6/") and n.op_type == "Conv")
    producer = {o: n for n in broken.graph.node for o in n.output}
    stored = producer[producer[conv.input[1]].input[0]].input[0]  # DequantizeLinear <- Clip <- int8 initializer
    init = next(i for i in broken.graph.initializer if i.name == stored)
    init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), stored))
    rows = onnx_export.layer_parity(model, broken, images, max_det=300)
    divergence = onnx_export.first_divergence(rows, 1e-3)
    assert divergence is not None and divergence["layer"].startswith("model.6 ")
    assert next(r for r in rows if r["layer"].startswith("model.7 "))["max_rel"] > 1e-3  # and it propagates


def test_int4_storage_packs_4bit_weights_and_runs_identically(exported, tmp_path):
    _, path, graph = exported
    packed = onnx_export.int4_storage(graph)
    saved = onnx_export.save_graph(tmp_path / "int4.onnx", packed)
    # The declared ranges survive in the metadata: 4-bit narrow range, 8-bit narrow range, one float conv.
    rows = onnx_export.conv_weight_precisions(onnx.load(str(saved)))
    assert [(r["bits"], r["low"], r["high"]) for r in rows] == [
        (r["bits"], r["low"], r["high"]) for r in onnx_export.conv_weight_precisions(graph)
    ]
    assert "Clip" not in onnx_export.op_counts(packed)  # every stored code was inside its Clip range
    stored = {i.name: i for i in packed.graph.initializer}
    four_bit = [i for i in stored.values() if i.data_type == onnx.TensorProto.INT4]
    assert len(four_bit) == sum(r["bits"] == 4 for r in rows)
    for init in four_bit:  # two codes per byte in raw_data, nothing in the varint fields
        assert len(init.raw_data) == (int(np.prod(init.dims)) + 1) // 2 and not init.int32_data
    floor = onnx_export.storage_floor_bytes(packed)
    assert floor < saved.stat().st_size <= 1.15 * floor
    images = {"images": np.random.rand(2, 3, IMGSZ, IMGSZ).astype(np.float32)}
    (a,) = onnx_export.runtime_session(graph).run(None, images)
    (b,) = onnx_export.runtime_session(saved).run(None, images)
    assert onnx_export.channel_relative_difference(a, b)[0] < 1e-6


def test_channel_relative_difference_finds_an_error_in_a_small_channel():
    reference = np.ones((2, 3, 4, 4), np.float32)
    reference[:, 1] *= 1e-3  # a low-magnitude channel beside channels of 1
    other = reference.copy()
    other[1, 1, 2, 3] += 1e-6  # 1e-3 of that channel, 1e-6 of the tensor's maximum
    assert np.abs(reference - other).max() / np.abs(reference).max() == pytest.approx(1e-6, rel=1e-3)  # whole tensor
    assert onnx_export.channel_relative_difference(reference, other) == (pytest.approx(1e-3, rel=1e-3), 1)
    assert onnx_export.channel_relative_difference(reference, reference) == (0.0, 0)


def test_storage_floor_counts_codes_at_their_bit_width():
    """A one-conv QCDQ graph, built by hand: 8x4x3x3 codes at 4 bit, 8 scales and 8 biases in float32."""
    from onnx import TensorProto, helper, numpy_helper

    codes = numpy_helper.from_array(np.zeros((8, 4, 3, 3), np.int8), "codes")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    zero = numpy_helper.from_array(np.zeros(8, np.int8), "zero")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    low, high = numpy_helper.from_array(np.array(-7, np.int8), "low"), numpy_helper.from_array(np.array(7, np.int8), "high")
    nodes = [
        helper.make_node("Clip", ["codes", "low", "high"], ["clipped"]),
        helper.make_node("DequantizeLinear", ["clipped", "scale", "zero"], ["weight"], axis=0),
        helper.make_node("Conv", ["x", "weight", "bias"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [codes, scale, zero, bias, low, high],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_export.storage_floor_bytes(model) == 8 * 4 * 9 // 2 + 8 * 4 + 8 * 4
    packed = onnx_export.int4_storage(model)
    assert onnx_export.op_counts(packed) == {"Conv": 1, "DequantizeLinear": 1}
    assert onnx_export.storage_floor_bytes(packed) == onnx_export.storage_floor_bytes(model)
    (init,) = [i for i in packed.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(init.raw_data) == 8 * 4 * 9 // 2
    # A BN the export could not fold (a per-tensor-scale conv keeps it) holds 4 float32 per channel as well.
    bn_params = [numpy_helper.from_array(np.ones(8, np.float32), name) for name in ("g", "b", "m", "v")]
    with_bn = helper.make_graph(
        [*nodes, helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [codes, scale, zero, bias, low, high, *bn_params],
    )
    model_bn = helper.make_model(with_bn, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_export.storage_floor_bytes(model_bn) == onnx_export.storage_floor_bytes(model) + 4 * 8 * 4


def test_missed_goals_are_sentences_that_name_the_first_diverging_layer():
    from qat_assets.core.export_stage import goal_failures

    layer = {"layer": "model.6 (C2f)", "max_rel": 0.02}
    assert goal_failures({"max_rel": 5e-7}, {"map50_95": 0.001, "map50": -0.0015}, None) == []
    (parity,) = goal_failures(
        {"max_rel": 0.03, "worst_layer": "model.23.cv3.1 (head output)", "worst_channel": 2}, {"map50_95": 0.0, "map50": 0.0}, layer
    )
    assert "3.00e-02" in parity and "model.6 (C2f)" in parity and "channel 2 of model.23.cv3.1" in parity
    (gap,) = goal_failures({"max_rel": 1e-6}, {"map50_95": -0.004, "map50": 0.0}, None)
    assert "map50_95" in gap and "-0.0040" in gap and "after the head" in gap


@pytest.fixture(scope="module")
def exported_end2end(exported, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "e2e.onnx"
    return onnx_export.export_quantized(exported[0], path, imgsz=IMGSZ, opset=17, max_det=300, end2end=True)


def test_end_to_end_file_is_the_one_to_one_head_with_a_top_k_output_at_any_image_size(exported, exported_end2end):
    model, path = exported[0], exported_end2end
    graph = onnx.load(str(path))
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert metadata["end2end"] == "True" and "'nms': False" in metadata["args"]
    assert onnx_export.op_counts(graph)["TopK"] == 2 and "BatchNormalization" not in onnx_export.op_counts(graph)
    session = onnx_export.runtime_session(path)
    # k = min(max_det, anchors) per input, as in PyTorch: 84 anchors at 64 px, 42 in a 64x32 rectangle, 300 at 640.
    for shape, k in (((2, 3, 64, 64), 84), ((1, 3, 64, 32), 42), ((1, 3, 640, 640), 300)):
        (detections,) = session.run(None, {"images": np.random.rand(*shape).astype(np.float32)})
        assert detections.shape == (shape[0], k, 6)
        assert set(np.unique(detections[..., 5])) <= {0.0, 1.0, 2.0}  # class indices of the 3 classes
    rows = onnx_export.layer_parity(model, graph, torch.rand(2, 3, IMGSZ, IMGSZ), max_det=300, end2end=True)
    head = onnx_export.head_parity(rows)
    assert head["max_rel"] < 1e-5 and "one2one_cv" in head["worst_layer"]
    assert {r["layer"].split(" ")[0] for r in rows if "head output" in r["layer"]} == {
        f"model.23.one2one_{branch}.{level}" for branch in ("cv2", "cv3") for level in range(3)
    }
    packed = onnx_export.int4_storage(graph)  # the INT4 form of the end-to-end file runs the same
    images = {"images": np.random.rand(2, 3, IMGSZ, IMGSZ).astype(np.float32)}
    np.testing.assert_array_equal(session.run(None, images)[0], onnx_export.runtime_session(packed).run(None, images)[0])


def test_onnx_predict_prints_detections_without_ultralytics(exported_end2end, tmp_path):
    """scripts/onnx_predict.py: the deployment pattern, run as a user runs it, in a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    image = tmp_path / "street.jpg"
    Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)).save(image)
    script = Path(__file__).resolve().parents[2] / "scripts" / "onnx_predict.py"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['onnx_predict.py', {str(image)!r}, '--model', {str(exported_end2end)!r}, '--conf', '0']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "print('imported ultralytics:', any(m.split('.')[0] == 'ultralytics' for m in sys.modules))\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[0].endswith("84 detections with score >= 0.0")  # 64x64 input after letterbox: 84 anchors
    boxes = [line.split() for line in lines[1:-1]]
    assert len(boxes) == 84 and {box[0] for box in boxes} <= {"a", "b", "c"}
    for box in boxes:  # x1 y1 x2 y2 back in the 80x48 image's pixels
        x1, y1, x2, y2 = (float(box[i]) for i in (3, 5, 7, 9))
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 48
    assert lines[-1] == "imported ultralytics: False"
