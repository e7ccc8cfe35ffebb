"""Detect objects in an image with the exported end-to-end W4 model, in onnxruntime alone.

The pattern to copy into a deployment: numpy, Pillow and onnxruntime, no Ultralytics and no NMS. The file's
metadata (written by the export) gives the class names, the stride and the image size; the one-to-one head's
output is already the final detections, (batch, k, 6) = x1, y1, x2, y2, score, class in input pixels.

    .venv/bin/python scripts/onnx_predict.py IMAGE --model $QAT_STORAGE/yolo10n/onnx_model/ema-0/w4a16_e2e.onnx
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

LETTERBOX_GRAY = 114  # Ultralytics' padding value


def model_metadata(session: onnxruntime.InferenceSession) -> dict:
    """names, stride, imgsz and end2end from the metadata the export writes (Ultralytics' keys)."""
    raw = session.get_modelmeta().custom_metadata_map
    missing = {"names", "stride", "imgsz", "end2end"} - raw.keys()
    if missing:
        raise SystemExit(f"the model has no {sorted(missing)} in its metadata; export it with the onnx_model asset")
    return {
        "names": ast.literal_eval(raw["names"]), "stride": int(raw["stride"]),
        "imgsz": ast.literal_eval(raw["imgsz"]), "end2end": raw["end2end"] == "True",
    }


def letterbox(image: Image.Image, size: int, stride: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio so the long side is `size`, pad each side to a multiple of `stride`
    (the file takes any such shape), centred as Ultralytics does. Returns NCHW float [0, 1], scale and padding."""
    width, height = image.size
    scale = min(size / width, size / height)
    new_w, new_h = round(width * scale), round(height * scale)
    padded_w, padded_h = -(-new_w // stride) * stride, -(-new_h // stride) * stride
    left, top = (padded_w - new_w) // 2, (padded_h - new_h) // 2
    canvas = Image.new("RGB", (padded_w, padded_h), (LETTERBOX_GRAY,) * 3)
    canvas.paste(image.convert("RGB").resize((new_w, new_h), Image.BILINEAR), (left, top))
    array = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255
    return np.ascontiguousarray(array), scale, (left, top)


def predict(model: Path, image_path: Path, conf: float) -> list[tuple[str, float, list[float]]]:
    """(class name, score, [x1, y1, x2, y2] in the original image's pixels) of every detection >= conf."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    meta = model_metadata(session)
    if not meta["end2end"]:
        raise SystemExit(f"{model} is the one-to-many file, whose output needs NMS; pass the end-to-end file "
                         "(w4a16_e2e.onnx) of the same onnx_model run")
    image = Image.open(image_path)
    batch, scale, (left, top) = letterbox(image, max(meta["imgsz"]), meta["stride"])
    (detections,) = session.run(None, {session.get_inputs()[0].name: batch})
    found = []
    for x1, y1, x2, y2, score, cls in detections[0]:
        if score < conf:
            continue  # the top-k is sorted by score, but a deployment should not rely on the order
        box = [(x1 - left) / scale, (y1 - top) / scale, (x2 - left) / scale, (y2 - top) / scale]
        box = [float(np.clip(v, 0, limit)) for v, limit in zip(box, (image.width, image.height) * 2)]
        found.append((meta["names"][int(cls)], float(score), box))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="the end-to-end file, w4a16_e2e.onnx")
    parser.add_argument("--conf", type=float, default=0.25, help="minimum score")
    args = parser.parse_args()
    for path in (args.image, args.model):
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
    found = predict(args.model, args.image, args.conf)
    print(f"{args.image}: {len(found)} detections with score >= {args.conf}")
    for name, score, (x1, y1, x2, y2) in found:
        print(f"{name:>16s} {score:.3f}  x1 {x1:7.1f}  y1 {y1:7.1f}  x2 {x2:7.1f}  y2 {y2:7.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
