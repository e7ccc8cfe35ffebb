"""Tiny COCO2017 trees for tests: a few small PNGs and hand-written annotation files.

`coco_document` gives a clean default document that a test can edit (add a crowd box, a bad image id, ...)
before `write_coco_tree` writes it, together with one image per listed image entry.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from PIL import Image

# Listed out of order and with gaps, as in real COCO: cat=2 -> class 0, bird=5 -> 1, dog=9 -> 2.
CATEGORIES = [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "bird"}]
WIDTH, HEIGHT = 40, 30


def coco_document(split: str, images: int = 4) -> dict:
    """A valid instances document: image i has one box of category CATEGORIES[i % 3]; the last has none."""
    first_id = 100 if split == "train" else 900
    entries = [
        {"id": first_id + i, "file_name": f"{first_id + i:012d}.png", "width": WIDTH, "height": HEIGHT}
        for i in range(images)
    ]
    annotations = [
        {"id": 10 * (first_id + i), "image_id": first_id + i, "category_id": CATEGORIES[i % 3]["id"],
         "bbox": [4.0, 6.0, 20.0, 12.0], "area": 240.0, "iscrowd": 0}
        for i in range(images - 1)
    ]
    return {"images": entries, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def write_coco_tree(root: Path, *, train: dict | None = None, val: dict | None = None) -> Path:
    """Write `root/annotations/instances_{train,val}2017.json` and a PNG for every image entry; return root."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, document in (("train", train or coco_document("train")), ("val", val or coco_document("val"))):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))
        image_dir = root / f"{split}2017"
        image_dir.mkdir(exist_ok=True)
        for entry in document["images"]:
            shade = entry["id"] % 256
            Image.new("RGB", (entry["width"], entry["height"]), (shade, 80, 160)).save(image_dir / entry["file_name"])
    return root
