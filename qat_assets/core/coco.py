"""COCO2017 tree -> deterministic YOLO-format subset that Ultralytics trains on directly.

Input: `annotations/instances_{train,val}2017.json`, `train2017/`, `val2017/`. Output (`out_dir`):
`images/{train,val}/` (links to the source images), `labels/{train,val}/*.txt` (`cls cx cy w h`, normalised,
6 decimals), `dataset.yaml` (Ultralytics format) and `subset.json` (the `SubsetResult`).

Why these rules:
- COCO category ids have gaps (1..90 for 80 classes); YOLO wants 0..nc-1, so ids map to indices in
  ascending id order, independent of how the JSON happens to list them.
- Crowd regions are not single objects; Ultralytics' own COCO converter drops them too.
- Boxes are clipped to the image and boxes under one pixel dropped: they only add noise to the loss.
- Images without boxes stay, as background (empty label file): they teach the model what is not an object.
- The subset is a seeded sample of image ids, sorted, so the same inputs give byte-identical label files
  and the same fingerprint; the fingerprint is what makes two runs comparable.
- The whole tree is built beside `out_dir` and renamed into place, so a failure never leaves a partial
  subset behind and an existing subset is only replaced by a complete one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from PIL import Image
from pydantic import BaseModel

SPLITS = ("train", "val")
# Bump when the label format or a conversion rule changes: old subsets then stop comparing equal.
CONVERSION_VERSION = 1
# From best to worst; a subset reports the worst mode any of its images needed.
LINK_MODES = ("hardlink", "symlink", "copy")
SKIP_HINT = "or set skip_bad_items (QAT_SKIP_BAD_ITEMS=true) to skip and count such items"


class DatasetError(ValueError):
    """The source data is missing or broken; the message names the file and what to do about it."""


class SubsetResult(BaseModel):
    root: Path
    dataset_yaml: Path
    source: str  # "coco:<root>" or "synthetic"
    counts: dict[str, dict[str, int]]  # split -> {"images", "background_images", "instances"}
    class_names: list[str]
    instances_per_class: dict[str, int]  # both splits together
    skipped: dict[str, int]  # reason -> count: crowd and tiny_box always, bad items with skip_bad_items
    fingerprint: str  # sha256 over conversion settings, classes, selected image ids and their labels
    link_mode: str  # "hardlink" | "symlink" | "copy"

    def preview_markdown(self) -> str:
        rows = ["| split | images | background | instances |", "|---|---:|---:|---:|"]
        for split, c in self.counts.items():
            rows.append(f"| {split} | {c['images']} | {c['background_images']} | {c['instances']} |")
        rows += ["", "| class | instances |", "|---|---:|"]
        rows += [f"| {name} | {self.instances_per_class.get(name, 0)} |" for name in self.class_names]
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "nothing"
        return "\n".join(rows) + f"\n\nSkipped: {skipped}. Source: `{self.source}`. Images: {self.link_mode}."

    @classmethod
    def read(cls, root: Path) -> "SubsetResult":
        """Load the result a conversion recorded in `root/subset.json`."""
        path = Path(root) / "subset.json"
        if not path.is_file():
            raise DatasetError(f"{path} is missing: {root} is not a finished subset; re-materialize coco_subset")
        return cls.model_validate_json(path.read_text())


@contextmanager
def staging_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty folder beside `destination`; on success it replaces `destination`, on failure it goes."""
    destination = Path(destination).absolute()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".staging", dir=destination.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        yield staging
        if destination.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside, then drop it.
            retired = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.old")
            os.replace(destination, retired)
            try:
                os.replace(staging, destination)
            except BaseException:
                os.replace(retired, destination)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_coco_subset(
    coco_root: Path,
    out_dir: Path,
    *,
    train_images: int,
    val_images: int,
    seed: int,
    skip_bad_items: bool,
    source: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> SubsetResult:
    """Convert a seeded sample of `train_images`/`val_images` COCO images into a YOLO subset at `out_dir`."""
    coco_root, out_dir = Path(coco_root).absolute(), Path(out_dir).absolute()
    if not coco_root.is_dir():
        raise DatasetError(
            f"COCO root {coco_root} does not exist; point QAT_COCO_ROOT at a folder holding annotations/, "
            "train2017/ and val2017/, or unset it to use the embedded synthetic set"
        )
    annotation_files = {s: coco_root / "annotations" / f"instances_{s}2017.json" for s in SPLITS}
    documents = {s: _load_instances(path) for s, path in annotation_files.items()}
    categories = _categories(documents["train"], annotation_files["train"])
    val_categories = _categories(documents["val"], annotation_files["val"])
    if val_categories != categories:
        raise DatasetError(
            f"{annotation_files['val']} lists categories {val_categories} but {annotation_files['train']} lists "
            f"{categories}; both splits must use the same categories: use annotation files from one COCO release"
        )
    class_of = {category_id: index for index, category_id in enumerate(sorted(categories))}
    class_names = [categories[category_id] for category_id in sorted(categories)]
    wanted = {"train": train_images, "val": val_images}

    problems = _Problems(skip_bad_items)
    fingerprint = hashlib.sha256()
    settings = {"version": CONVERSION_VERSION, "seed": seed, "wanted": wanted, "classes": sorted(categories.items())}
    fingerprint.update(json.dumps(settings, sort_keys=True).encode())
    counts: dict[str, dict[str, int]] = {}
    per_class: Counter[str] = Counter()
    worst_link = 0
    with staging_directory(out_dir) as staging:
        for split in SPLITS:
            split_result = _convert_split(
                coco_root, split, documents[split], annotation_files[split], wanted[split], seed, class_of,
                problems, staging, log,
            )
            counts[split] = split_result.counts
            per_class.update(class_names[c] for c in split_result.classes)
            worst_link = max(worst_link, split_result.worst_link)
            fingerprint.update(split_result.digest)
        (staging / "dataset.yaml").write_text(yaml.safe_dump({
            "path": str(out_dir), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(class_names)),
        }, sort_keys=False))
        result = SubsetResult(
            root=out_dir, dataset_yaml=out_dir / "dataset.yaml", source=source or f"coco:{coco_root}",
            counts=counts, class_names=class_names, instances_per_class={n: per_class[n] for n in class_names},
            skipped=dict(sorted(problems.counts.items())), fingerprint=fingerprint.hexdigest(),
            link_mode=LINK_MODES[worst_link],
        )
        (staging / "subset.json").write_text(result.model_dump_json(indent=2) + "\n")
    if problems.counts:
        log(f"skipped: {dict(sorted(problems.counts.items()))}")
    return result


class _Problems:
    """Bad items raise a DatasetError, or with skip_bad_items are counted; planned drops are always counted."""

    def __init__(self, skip_bad_items: bool) -> None:
        self.skip_bad_items = skip_bad_items
        self.counts: Counter[str] = Counter()

    def bad(self, reason: str, message: str) -> None:
        if not self.skip_bad_items:
            raise DatasetError(f"{message}; {SKIP_HINT}")
        self.counts[reason] += 1

    def drop(self, reason: str) -> None:
        self.counts[reason] += 1


class _SplitResult:
    def __init__(self) -> None:
        self.counts = {"images": 0, "background_images": 0, "instances": 0}
        self.classes: list[int] = []
        self.worst_link = 0
        self.hash = hashlib.sha256()

    @property
    def digest(self) -> bytes:
        return self.hash.digest()


def _convert_split(
    coco_root: Path, split: str, document: dict, annotation_file: Path, wanted: int, seed: int,
    class_of: dict[int, int], problems: _Problems, staging: Path, log: Callable[[str], None],
) -> _SplitResult:
    images = _images(document, annotation_file, problems)
    boxes = _boxes_by_image(document, annotation_file, images, class_of, problems)
    available = sorted(images)
    if wanted > len(available):
        log(f"{split}: {annotation_file.name} lists {len(available)} images, fewer than the {wanted} asked for; "
            "using all of them")
    chosen = sorted(random.Random(f"{seed}:{split}").sample(available, min(wanted, len(available))))

    image_dir, label_dir = staging / "images" / split, staging / "labels" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    result = _SplitResult()
    for image_id in chosen:
        file_name, width, height = images[image_id]
        source = coco_root / f"{split}2017" / file_name
        if not _image_is_usable(source, width, height, annotation_file, problems):
            continue
        lines, classes = _label_lines(boxes[image_id], width, height, problems)
        label_text = "".join(line + "\n" for line in lines)
        (label_dir / f"{Path(file_name).stem}.txt").write_text(label_text)
        mode = link_file(source, image_dir / Path(file_name).name)
        result.worst_link = max(result.worst_link, LINK_MODES.index(mode))
        result.counts["images"] += 1
        result.counts["background_images"] += not lines
        result.counts["instances"] += len(lines)
        result.classes += classes
        result.hash.update(f"{split}\t{image_id}\t{file_name}\t{width}\t{height}\n{label_text}".encode())
    if not result.counts["images"]:
        raise DatasetError(
            f"no usable images selected for the {split} split from {annotation_file} ({len(chosen)} chosen, "
            f"{len(available)} listed); an empty subset cannot be trained on: check {coco_root / f'{split}2017'} "
            "and the image counts in the settings"
        )
    log(f"{split}: {result.counts['images']} images ({result.counts['background_images']} background), "
        f"{result.counts['instances']} boxes")
    return result


def _load_instances(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing; a COCO2017 root needs annotations/instances_train2017.json and "
            "instances_val2017.json (from annotations_trainval2017.zip), or unset QAT_COCO_ROOT to use the "
            "embedded synthetic set"
        )
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{path} is not valid JSON ({exc}); re-extract it from the COCO annotation archive"
        ) from None
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read ({exc}); check that the file is readable") from None
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"{path} is not a COCO instances file: it needs the lists 'images', 'annotations' and 'categories'; "
            "re-extract it from the COCO annotation archive"
        )
    return document


def _categories(document: dict, path: Path) -> dict[int, str]:
    categories: dict[int, str] = {}
    for entry in document["categories"]:
        if not (isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("name"), str)):
            raise DatasetError(f"{path}: category {entry!r:.100} needs an integer 'id' and a 'name'; fix the file")
        if entry["id"] in categories:
            raise DatasetError(f"{path}: category id {entry['id']} is listed twice; fix the file")
        categories[entry["id"]] = entry["name"]
    if not categories:
        raise DatasetError(f"{path} lists no categories; a detection subset needs at least one class")
    return categories


def _images(document: dict, path: Path, problems: _Problems) -> dict[int, tuple[str, int, int]]:
    images: dict[int, tuple[str, int, int]] = {}
    names: set[str] = set()
    for entry in document["images"]:
        ok = isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("file_name"), str)
        ok = ok and all(_is_int(entry.get(k)) and entry[k] > 0 for k in ("width", "height"))
        if not ok:
            problems.bad("malformed_image", f"{path}: image entry {entry!r:.100} needs an integer 'id', a "
                         "'file_name' and positive integer 'width'/'height'; fix the entry")
            continue
        name = Path(entry["file_name"]).name  # never let a file name reach outside the image folder
        if entry["id"] in images or name in names:
            problems.bad("malformed_image", f"{path}: image id {entry['id']} or file name {name} is listed "
                         "twice; fix the entry")
            continue
        images[entry["id"]] = (name, entry["width"], entry["height"])
        names.add(name)
    return images


def _boxes_by_image(
    document: dict, path: Path, images: dict, class_of: dict[int, int], problems: _Problems,
) -> dict[int, list[tuple[int, list[float], bool]]]:
    boxes: dict[int, list[tuple[int, list[float], bool]]] = defaultdict(list)
    for entry in document["annotations"]:
        bbox = entry.get("bbox") if isinstance(entry, dict) else None
        if not (
            isinstance(entry, dict) and _is_int(entry.get("image_id")) and _is_int(entry.get("category_id"))
            and isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
        ):
            problems.bad("malformed_annotation", f"{path}: annotation {entry!r:.100} needs integer 'image_id' "
                         "and 'category_id' and a 'bbox' of four numbers; fix the entry")
            continue
        if entry["image_id"] not in images:
            problems.bad("unknown_image_id", f"{path}: annotation {entry.get('id')} refers to image id "
                         f"{entry['image_id']}, which is not in the file's 'images' list; fix or remove it")
            continue
        if entry["category_id"] not in class_of:
            problems.bad("unknown_category", f"{path}: annotation {entry.get('id')} has category id "
                         f"{entry['category_id']}, which is not in the file's 'categories'; fix or remove it")
            continue
        boxes[entry["image_id"]].append((class_of[entry["category_id"]], bbox, bool(entry.get("iscrowd", 0))))
    return boxes


def _image_is_usable(source: Path, width: int, height: int, annotation_file: Path, problems: _Problems) -> bool:
    if not source.is_file():
        problems.bad("missing_image", f"{source} is missing (listed in {annotation_file}); restore it from the "
                     "COCO image archive")
        return False
    try:
        with _unpatched_pil_open()(source) as image:  # reads the header only
            size = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        problems.bad("unreadable_image", f"{source} cannot be read as an image ({exc}); restore it from the "
                     "COCO image archive")
        return False
    if size != (width, height):
        problems.bad("image_size_mismatch", f"{source} is {size[0]}x{size[1]} but {annotation_file} says "
                     f"{width}x{height}, so its boxes cannot be placed; restore the original image")
        return False
    return True


def _unpatched_pil_open() -> Callable:
    """PIL's own Image.open, even after Ultralytics has wrapped it.

    Ultralytics replaces `PIL.Image.open` with a wrapper that, on a file Pillow cannot identify, tries to pip
    install pi-heif and then fails with ModuleNotFoundError. A broken COCO image must be reported as such,
    never trigger an install, so use the original it keeps.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)


def _label_lines(
    boxes: list[tuple[int, list[float], bool]], width: int, height: int, problems: _Problems,
) -> tuple[list[str], list[int]]:
    lines, classes = [], []
    for class_index, (x, y, w, h), crowd in boxes:
        if crowd:
            problems.drop("crowd")
            continue
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            problems.drop("tiny_box")
            continue
        lines.append(f"{class_index} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                     f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
        classes.append(class_index)
    return lines, classes


def link_file(source: Path, destination: Path) -> str:
    """Put `source` at `destination` as cheaply as the file system allows; return the LINK_MODES entry used."""
    try:
        os.link(source, destination)
        return "hardlink"
    except OSError:  # another file system, or hard links not supported
        pass
    try:
        os.symlink(source.resolve(), destination)
        return "symlink"
    except OSError:
        shutil.copy2(source, destination)
        return "copy"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
