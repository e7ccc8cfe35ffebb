"""Building YOLOv10 variants and reading the floating-point checkpoints they start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifacts import load_checkpoint, read_sidecar


class CheckpointError(ValueError):
    """A user-supplied checkpoint cannot serve as the starting point; the message says why and what to do."""


def variant_yaml(variant: str) -> str:
    """`yolo10n` -> `yolov10n.yaml` (the model definitions ship inside the ultralytics package)."""
    scale = variant.removeprefix("yolo10")
    if variant == scale or len(scale) != 1:
        raise ValueError(f"unknown variant {variant!r}; expected yolo10n, yolo10s, yolo10m, ...")
    return f"yolov10{scale}.yaml"


def build_detection_model(variant: str, names: list[str]) -> torch.nn.Module:
    """A freshly initialised YOLOv10 DetectionModel with `len(names)` classes and Ultralytics' default hyp."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(variant_yaml(variant), nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    model.args = get_cfg()  # loss gains (box, cls, dfl) for model.loss outside a trainer
    return model


def load_float_model(checkpoint: Path, expected_sha256: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model saved by the pretrained_checkpoint asset, with its sidecar."""
    sidecar = read_sidecar(checkpoint)
    model = build_detection_model(sidecar["variant"], sidecar["names"])
    model.load_state_dict(load_checkpoint(checkpoint, expected_sha256)["model"])
    return model, sidecar


def read_user_checkpoint(path: Path, variant: str, names: list[str], on_class_mismatch: str) -> tuple[torch.nn.Module, dict]:
    """Load an Ultralytics `yolov10?.pt`, check it is this variant, and fit it to the dataset's classes.

    Returns the model and a note dict (`head`: kept or re-initialised, with the class counts). Ultralytics
    checkpoints are pickled modules, so this is the one place that loads with weights_only=False: only
    point QAT_CHECKPOINT_DIR at files you trust.
    """
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint as ultralytics_load

    path = Path(path)
    try:
        loaded, saved = ultralytics_load(str(path))
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable Ultralytics checkpoint ({type(exc).__name__}: {exc}); "
            "replace it with an intact yolov10 .pt file or remove it to train the variant here"
        ) from exc
    yaml = getattr(loaded, "yaml", {}) or {}
    found_variant = f"yolo10{yaml.get('scale', '')}"
    is_v10 = type(loaded.model[-1]).__name__ == "v10Detect" if isinstance(loaded, DetectionModel) else False
    if not is_v10 or found_variant != variant:
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__} ({yaml.get('yaml_file', 'unknown yaml')}, scale "
            f"{yaml.get('scale')!r}), not a YOLOv10 {variant}; put the matching yolov10{variant[-1]}.pt there"
        )
    model = build_detection_model(variant, names)
    state = loaded.float().state_dict()
    _check_state_keys(path, model.state_dict(), state, version_of(saved))
    classes = int(loaded.model[-1].nc)
    if classes == len(names):
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # same names, other shapes: PyTorch lists them
            raise CheckpointError(
                f"{path} (written by Ultralytics {version_of(saved)}) has tensors of other shapes than this "
                f"Ultralytics' {variant}: {exc}"
            ) from exc
        return model, {"head": "kept", "checkpoint_classes": classes, "dataset_classes": len(names)}
    if on_class_mismatch == "fail":
        raise CheckpointError(
            f"{path} predicts {classes} classes but the dataset has {len(names)}; use a dataset with the "
            "same classes, or set QAT_ON_CLASS_MISMATCH=reinit_head to re-initialise the head and fine-tune"
        )
    model.load(loaded.float(), verbose=False)  # copies every tensor whose name and shape match
    return model, {"head": "re-initialised", "checkpoint_classes": classes, "dataset_classes": len(names)}


def version_of(saved: object) -> str:
    """The Ultralytics version recorded in a loaded checkpoint dict (Ultralytics' trainer writes `version`)."""
    version = saved.get("version") if isinstance(saved, dict) else None
    return str(version) if version else "of unknown version (none recorded)"


# Keys listed in a mismatch error; a module renamed between Ultralytics versions can account for hundreds.
LISTED_KEYS = 10


def _check_state_keys(path: Path, expected: dict, found: dict, version: str) -> None:
    """Refuse a checkpoint whose tensor names differ from this Ultralytics' model of the same variant.

    A checkpoint written by another Ultralytics version can pickle modules whose parameters or buffers were
    added, dropped or renamed since; a strict load would stop with a bare PyTorch error, and Ultralytics'
    own partial load (used when the head is re-initialised) would silently leave the missing tensors at
    their random initialisation. Shapes are not compared here: the class-output convs differ in shape by
    design when the class count does, and a strict load reports any other shape difference itself.
    """
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if not missing and not unexpected:
        return
    from ultralytics import __version__ as installed

    def listed(keys: list[str]) -> str:
        more = f", ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
        return (", ".join(keys[:LISTED_KEYS]) + more) if keys else "none"

    raise CheckpointError(
        f"{path} does not fit this Ultralytics' yolov10 model: written by Ultralytics {version}, read with {installed}; "
        f"{len(missing)} missing keys: {listed(missing)}; {len(unexpected)} unexpected keys: {listed(unexpected)}. "
        f"Use a checkpoint written by Ultralytics {installed}, or run with the Ultralytics version that wrote this one"
    )
