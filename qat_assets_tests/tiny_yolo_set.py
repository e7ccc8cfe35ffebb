"""A handful of small images with coloured boxes, in Ultralytics YOLO format, for QC and BN tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def write_tiny_yolo_set(root: Path, count: int, imgsz: int) -> str:
    """`count` images of `imgsz` px with one or two solid boxes each (class = colour); returns the data YAML.

    The YAML lists the same images as train and val.
    """
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = np.full((imgsz, imgsz, 3), 40, dtype=np.uint8)
        rows = []
        for _ in range(1 + i % 2):
            cls = int(rng.integers(3))
            w, h = rng.integers(imgsz // 4, imgsz // 2, size=2)
            x0, y0 = rng.integers(0, imgsz - w), rng.integers(0, imgsz - h)
            pixels[y0:y0 + h, x0:x0 + w] = COLOURS[cls]
            rows.append(f"{cls} {(x0 + w / 2) / imgsz} {(y0 + h / 2) / imgsz} {w / imgsz} {h / imgsz}")
        image = root / "images" / f"{i}.png"
        Image.fromarray(pixels).save(image)
        (root / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")
        paths.append(str(image))
    (root / "list.txt").write_text("\n".join(paths) + "\n")
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: list.txt\nval: list.txt\nnames:\n  0: red\n  1: green\n  2: blue\n")
    return str(yaml)
