"""The embedded default data set: solid shapes on textured backgrounds, written as a COCO2017 tree.

It is written in COCO format (not YOLO) on purpose, so that the embedded default goes through exactly the
same conversion as real COCO. The category ids are non-contiguous and listed out of order in the JSON, as
in COCO itself, so the id -> class-index mapping is exercised on every run.

Objects are big (20-50 % of the image side), filled, vivid on a muted background, and the classes differ
by shape only (colour is random), so yolov10n trained from scratch learns it in a few CPU minutes at 160 px.

`difficulty="hard"` (issue 25: a task that keeps the network capacity-bound) has 24 classes, each a shape in a
hue band (6 shapes x 4 bands, so colour matters too), objects of 10-30 % of the side, up to 10 per image,
overlapping up to IoU 0.5 (a later object occludes at most half of an earlier one, whose box stays its full extent), unlabelled
clutter (desaturated shapes of every kind) and a stronger background texture.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from qat_assets.core.coco import staging_directory

# Listed out of order and with gaps on purpose (see module docstring).
CATEGORIES = ({"id": 7, "name": "triangle"}, {"id": 1, "name": "rectangle"}, {"id": 3, "name": "ellipse"})
SPLITS = ("train", "val")
# Every tenth image holds no object, so background-only images are part of the set.
BACKGROUND_EVERY = 10
MAX_OBJECTS = 5
# Largest IoU a new object may have with one already placed: some overlap, but every object stays visible.
MAX_OVERLAP_IOU = 0.2

HARD_SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross", "ring")
HARD_HUES = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.62}  # band centres; a band is +-0.05 wide


@dataclass(frozen=True)
class Difficulty:
    categories: tuple[dict, ...]
    sizes: tuple[float, float]  # object side as a fraction of the image side
    max_objects: int
    max_overlap_iou: float
    clutter: int  # unlabelled shapes per image, at most
    texture: int  # amplitude of the background's colour blobs

    def colour_of(self, category: dict, rng: np.random.Generator) -> tuple[int, int, int]:
        if "hue" not in category:
            return _vivid_colour(rng)
        return _vivid_colour(rng, hue=category["hue"] + float(rng.uniform(-0.05, 0.05)))


EASY = Difficulty(CATEGORIES, (0.2, 0.5), MAX_OBJECTS, MAX_OVERLAP_IOU, clutter=0, texture=30)
# Ids 2, 4, ..., 48, listed from the last: non-contiguous and out of order, as in COCO.
HARD = Difficulty(
    tuple(reversed([{"id": 2 + 2 * (i * len(HARD_HUES) + j), "name": f"{hue} {shape}", "shape": shape, "hue": value}
                    for i, shape in enumerate(HARD_SHAPES) for j, (hue, value) in enumerate(HARD_HUES.items())])),
    (0.1, 0.3), 10, 0.5, clutter=6, texture=60,
)
DIFFICULTIES = {"easy": EASY, "hard": HARD}


def write_synthetic_coco(
    root: Path, *, train_images: int, val_images: int, image_size: int, seed: int,
    difficulty: Literal["easy", "hard"] = "easy",
) -> dict:
    """Write `root/annotations/instances_{train,val}2017.json` and `root/{train,val}2017/*.jpg`.

    The tree is built beside `root` and renamed into place, so `root` is either complete or untouched.
    Every image is drawn from its own generator seeded by (seed, split, index): the output depends only on
    the arguments. Returns a summary (counts per split, categories).
    """
    if train_images < 1 or val_images < 1:
        raise ValueError(f"synthetic set needs at least one image per split, got {train_images}/{val_images}")
    if image_size < 32:
        raise ValueError(f"synthetic image_size must be at least 32 px, got {image_size}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"synthetic difficulty {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    spec = DIFFICULTIES[difficulty]
    summary: dict = {"categories": {c["id"]: c["name"] for c in spec.categories}, "image_size": image_size,
                     "seed": seed, "difficulty": difficulty}
    with staging_directory(Path(root)) as staging:
        (staging / "annotations").mkdir()
        for split_index, (split, count) in enumerate(zip(SPLITS, (train_images, val_images))):
            coco = _write_split(staging, split, split_index, count, image_size, seed, spec)
            summary[split] = {"images": len(coco["images"]), "annotations": len(coco["annotations"])}
    return summary


def _write_split(
    staging: Path, split: str, split_index: int, count: int, image_size: int, seed: int, spec: Difficulty
) -> dict:
    image_dir = staging / f"{split}2017"
    image_dir.mkdir()
    images, annotations = [], []
    # Image ids of the two splits never collide, as in COCO.
    first_id = 1 + split_index * 1_000_000
    for index in range(count):
        image_id = first_id + index
        rng = np.random.default_rng([seed, split_index, index])
        picture, boxes = _draw_image(rng, image_size, spec, empty=index % BACKGROUND_EVERY == BACKGROUND_EVERY - 1)
        file_name = f"{image_id:012d}.jpg"
        picture.save(image_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for category_id, (x, y, w, h) in boxes:
            annotations.append({
                "id": len(annotations) + 1 + split_index * 10_000_000, "image_id": image_id,
                "category_id": category_id, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
    categories = [{"id": c["id"], "name": c["name"]} for c in spec.categories]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (staging / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return coco


def _draw_image(rng: np.random.Generator, size: int, spec: Difficulty, *, empty: bool) -> tuple[Image.Image, list]:
    picture = _textured_background(rng, size, spec.texture)
    draw = ImageDraw.Draw(picture)
    # Unlabelled, under the objects; the easy set draws nothing for it, so its images stay as they were.
    for _ in range(int(rng.integers(0, spec.clutter + 1)) if spec.clutter else 0):
        w, h = (rng.uniform(*spec.sizes, size=2) * size).round()
        box = (float(round(rng.uniform(0, size - w))), float(round(rng.uniform(0, size - h))), float(w), float(h))
        grey_ish = _vivid_colour(rng, saturation=(0.0, 0.25))
        _draw_shape(draw, HARD_SHAPES[int(rng.integers(len(HARD_SHAPES)))], box, grey_ish, rng)
    boxes: list[tuple[int, tuple[float, float, float, float]]] = []
    wanted = 0 if empty else int(rng.integers(1, spec.max_objects + 1))
    for _ in range(wanted * 10):  # a few placement attempts per object; crowded images keep fewer objects
        if len(boxes) == wanted:
            break
        w, h = (rng.uniform(*spec.sizes, size=2) * size).round()
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        x, y = float(round(x)), float(round(y))
        box = (x, y, float(w), float(h))
        # IoU alone lets a big later object cover a small earlier one whole: also keep at least half of each
        # smaller box uncovered by any single other, so every labelled object stays visible.
        if any(_iou(box, other) > spec.max_overlap_iou or _covered(box, other) > 0.5 for _, other in boxes):
            continue
        category = spec.categories[int(rng.integers(len(spec.categories)))]
        colour = spec.colour_of(category, rng)
        _draw_shape(draw, category.get("shape", category["name"]), box, colour, rng)
        boxes.append((category["id"], box))
    return picture, boxes


def _textured_background(rng: np.random.Generator, size: int, texture: int) -> Image.Image:
    # A grey level with faint low-frequency colour blobs (a coarse grid upsampled) and per-pixel noise: never
    # flat, but muted, so the saturated shapes stand out (stronger clutter kept yolov10n under 0.3 mAP50-95).
    grey = int(rng.integers(60, 196))
    coarse = np.clip(grey + rng.integers(-texture, texture + 1, size=(6, 6, 3)), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-15, 16, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def _vivid_colour(
    rng: np.random.Generator, hue: float | None = None, saturation: tuple[float, float] = (0.65, 1.0)
) -> tuple[int, int, int]:
    # Any hue (or the given one), saturated and bright: objects differ from the muted background by colour;
    # in the easy set from each other only by shape.
    hue = rng.uniform(0, 1) if hue is None else hue % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(0.6, 1))
    return int(red * 255), int(green * 255), int(blue * 255)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: tuple, colour: tuple, rng: np.random.Generator) -> None:
    # Shapes touch all four sides of their box, so the box is exactly the object's extent.
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    outline = tuple(255 - c for c in colour)
    if name == "rectangle":
        draw.rectangle((x, y, x1, y1), fill=colour, outline=outline)
    elif name == "ellipse":
        draw.ellipse((x, y, x1, y1), fill=colour, outline=outline)
    elif name == "diamond":
        cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=colour, outline=outline)
    elif name == "cross":
        third_w, third_h = (w - 1) / 3, (h - 1) / 3
        draw.rectangle((x + third_w, y, x1 - third_w, y1), fill=colour)
        draw.rectangle((x, y + third_h, x1, y1 - third_h), fill=colour)
    elif name == "ring":
        draw.ellipse((x, y, x1, y1), outline=colour, width=max(1, round(min(w, h) / 5)))
    else:
        apex = x + float(rng.uniform(0.2, 0.8)) * (w - 1)
        draw.polygon([(x, y1), (x1, y1), (apex, y)], fill=colour, outline=outline)


def _intersection(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy


def _covered(a: tuple, b: tuple) -> float:
    """The share of the smaller of two boxes that the other covers."""
    return _intersection(a, b) / min(a[2] * a[3], b[2] * b[3])


def _iou(a: tuple, b: tuple) -> float:
    inter = _intersection(a, b)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0
