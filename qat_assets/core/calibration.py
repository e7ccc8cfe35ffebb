"""The QC calibration set D_c: a seeded sample of the subset's training images.

The sample gets its own images/labels folders (image links, label copies) instead of pointing into the
subset: re-materializing the subset then cannot silently change a calibration set that was already
recorded, and Ultralytics' label cache for D_c lands in D_c's folder rather than in the subset's.
`dataset.yaml` points both `train` and `val` at the image list, so an Ultralytics DetectionTrainer
trains (QC) and validates on exactly these images.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel

from qat_assets.core.coco import DatasetError, SubsetResult, link_file, staging_directory

SPLIT = "calibration"


class CalibrationResult(BaseModel):
    root: Path
    dataset_yaml: Path
    images: int
    fingerprint: str  # sha256 over the subset fingerprint, the chosen images, size and seed
    image_list: Path  # one absolute image path per line

    @classmethod
    def read(cls, root: Path) -> "CalibrationResult":
        """Load the result recorded in `root/calibration.json`."""
        path = Path(root) / "calibration.json"
        if not path.is_file():
            raise DatasetError(f"{path} is missing: {root} is not a finished calibration set; materialize calibration_subset")
        return cls.model_validate_json(path.read_text())


def select_calibration_subset(subset: SubsetResult, out_dir: Path, *, size: int, seed: int) -> CalibrationResult:
    """Sample `size` training images of `subset` into a calibration set at `out_dir` (built atomically)."""
    out_dir = Path(out_dir).absolute()
    image_dir = subset.root / "images" / "train"
    available = sorted(p.name for p in image_dir.iterdir()) if image_dir.is_dir() else []
    if not available:
        raise DatasetError(f"{image_dir} holds no images; re-materialize coco_subset")
    if not 1 <= size <= len(available):
        raise DatasetError(
            f"calibration size {size} is not possible: the subset's training split has {len(available)} images; "
            f"set calibration_images (QAT_CALIBRATION_IMAGES) between 1 and {len(available)}"
        )
    chosen = sorted(random.Random(f"calibration:{seed}").sample(available, size))
    fingerprint = hashlib.sha256(json.dumps(
        {"subset": subset.fingerprint, "images": chosen, "size": size, "seed": seed}, sort_keys=True,
    ).encode()).hexdigest()

    with staging_directory(out_dir) as staging:
        (staging / "images" / SPLIT).mkdir(parents=True)
        (staging / "labels" / SPLIT).mkdir(parents=True)
        for name in chosen:
            label = subset.root / "labels" / "train" / f"{Path(name).stem}.txt"
            if not label.is_file():
                raise DatasetError(
                    f"{label} is missing: the subset at {subset.root} is damaged; re-materialize coco_subset"
                )
            link_file(image_dir / name, staging / "images" / SPLIT / name)
            shutil.copyfile(label, staging / "labels" / SPLIT / label.name)
        # Paths name the final folder, which exists once the staging folder is renamed into place.
        (staging / "images.txt").write_text("".join(f"{out_dir / 'images' / SPLIT / n}\n" for n in chosen))
        (staging / "dataset.yaml").write_text(yaml.safe_dump({
            "path": str(out_dir), "train": "images.txt", "val": "images.txt",
            "names": dict(enumerate(subset.class_names)),
        }, sort_keys=False))
        result = CalibrationResult(
            root=out_dir, dataset_yaml=out_dir / "dataset.yaml", images=size, fingerprint=fingerprint,
            image_list=out_dir / "images.txt",
        )
        (staging / "calibration.json").write_text(result.model_dump_json(indent=2) + "\n")
    return result


def select_heldout_set(dataset_yaml: Path, calibration_yaml: Path, out_dir: Path, *, size: int) -> Path | None:
    """Up to `size` training images of `dataset_yaml` that are not in D_c, as a dataset at `out_dir`; its YAML.

    QC trains on D_c, so its calibration loss falls almost by construction; whether QC made the model worse is
    judged on these images instead (see `qc.run_qc`). The first `size` by file name: deterministic, and unrelated
    to how D_c was drawn. Linked into their own folders like D_c, so Ultralytics' label cache for them lands
    here and not in the subset. None when D_c holds every training image.
    """
    from ultralytics.data.utils import img2label_paths

    data = yaml.safe_load(Path(dataset_yaml).read_text())
    image_dir = Path(data["path"]) / data["train"]
    if not image_dir.is_dir():
        raise DatasetError(f"{dataset_yaml}: train split {image_dir} is not a folder of images; re-materialize coco_subset")
    calibration_data = yaml.safe_load(Path(calibration_yaml).read_text())
    calibration_list = Path(calibration_data["path"]) / calibration_data["train"]  # images.txt, as written above
    calibration = {Path(line).name for line in calibration_list.read_text().split()}
    chosen = sorted(p for p in image_dir.iterdir() if p.name not in calibration)[:size]
    if not chosen:
        return None
    out_dir = Path(out_dir).absolute()
    with staging_directory(out_dir) as staging:
        (staging / "images" / "heldout").mkdir(parents=True)
        (staging / "labels" / "heldout").mkdir(parents=True)
        for image, label in zip(chosen, img2label_paths([str(p) for p in chosen])):
            link_file(image, staging / "images" / "heldout" / image.name)
            if Path(label).is_file():  # an image without objects has no label file
                shutil.copyfile(label, staging / "labels" / "heldout" / Path(label).name)
        (staging / "dataset.yaml").write_text(yaml.safe_dump({
            "path": str(out_dir), "train": "images/heldout", "val": "images/heldout", "names": data["names"],
        }, sort_keys=False))
    return out_dir / "dataset.yaml"
