"""Where, and on how many val images, the export stage measures the ONNX files' mAP.

On a GPU step the ONNX files run through onnxruntime's CUDA provider when `onnxruntime-gpu` is installed, on the
whole val set like every other figure. Without that provider Ultralytics' AutoBackend falls back to the CPU,
and at the `coco` profile three CPU passes over 5,000 images at 640 px would keep the step's GPU slot idle for
hours. Then the ONNX files, and PyTorch beside them (so each mAP delta compares the same images), are evaluated
on the first `onnx_cpu_val_images` val images. The exact check, per-channel parity of the raw head outputs,
runs either way. On a CPU step every figure is measured on the CPU already: the whole val set.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

CUDA_PROVIDER = "CUDAExecutionProvider"
IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class EvaluationScope:
    provider: str  # the onnxruntime provider the files' mAP runs on
    images: int  # val images in each of the export's mAP figures
    val_images: int  # val images in the whole set
    reason: str

    @property
    def is_subset(self) -> bool:
        return self.images < self.val_images

    def as_record(self) -> dict:
        return asdict(self)


def is_gpu_device(device: str) -> bool:
    """A device string Ultralytics places on a CUDA GPU ("cuda", "cuda:1", "0", "0,1")."""
    device = device.strip().lower()
    return device not in ("", "cpu") and not device.startswith("mps")


def evaluation_scope(device: str, providers: list[str], val_images: int, cpu_limit: int) -> EvaluationScope:
    """The export's evaluation scope for a step on `device`, given onnxruntime's available `providers`."""
    if not is_gpu_device(device):
        return EvaluationScope("CPUExecutionProvider", val_images, val_images, "a CPU step: the whole val set on the CPU")
    if CUDA_PROVIDER in providers:
        return EvaluationScope(CUDA_PROVIDER, val_images, val_images, "a GPU step with onnxruntime's CUDA provider")
    images = min(val_images, cpu_limit)
    return EvaluationScope(
        "CPUExecutionProvider", images, val_images,
        f"a GPU step, but onnxruntime has no CUDA provider (installed providers: {', '.join(providers)}): the ONNX "
        f"files and PyTorch beside them are evaluated on the first {images} of {val_images} val images so the step "
        f"does not hold its GPU for CPU passes over all of them (QAT_ONNX_CPU_VAL_IMAGES). For every image, "
        f"replace onnxruntime with onnxruntime-gpu (pip uninstall -y onnxruntime && pip install onnxruntime-gpu)",
    )


def val_image_files(data: dict) -> list[Path]:
    """The val images of a dataset dict (Ultralytics' `check_det_dataset`), in the order its loader reads them."""
    sources = data["val"] if isinstance(data["val"], list) else [data["val"]]
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        else:  # a list file: one image path per line, relative to the list's folder
            files += [Path(os.path.abspath(source.parent / line.strip())) for line in source.read_text().splitlines() if line.strip()]
    # Absolute but never resolved: the subset's images may be symlinks into the COCO tree (core/coco.py
    # link_file), and Ultralytics finds each label by replacing /images/ with /labels/ in the image's own path.
    return sorted(files)  # Ultralytics sorts the image files it loads


def val_subset_yaml(data_yaml: Path, count: int, out_dir: Path) -> Path:
    """A dataset YAML whose val split is the first `count` val images of `data_yaml` (labels found beside them as
    for the whole set); train and the class names are unchanged."""
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml), autodownload=False)
    files = val_image_files(data)[:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = out_dir / f"val_first_{count}.txt"
    listing.write_text("".join(f"{os.path.abspath(path)}\n" for path in files))
    config = yaml.safe_load(Path(data_yaml).read_text())
    config.update(path=str(Path(data["path"]).resolve()), val=str(listing))
    subset = out_dir / f"dataset_val_first_{count}.yaml"
    subset.write_text(yaml.safe_dump(config, sort_keys=False))
    return subset
