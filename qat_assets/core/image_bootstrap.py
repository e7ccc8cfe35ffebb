"""mAP50-95 over resampled val images: the sampling noise of one model, and of two models' difference.

Ultralytics' validator reduces each val image to its matching statistics (per prediction: correct or not
at the 10 IoU thresholds, confidence, class; per target: class) and computes AP once over all of them.
Kept per image, mAP50-95 can be recomputed on any resample of the images:

- `bootstrap_map`: how much one model's mAP50-95 moves when the val set is redrawn (its per-image noise);
- `paired_bootstrap`: two models evaluated on the same images (the live and EMA weights of one seed) and
  resampled together, so what the images share cancels: the within-seed uncertainty of their difference.
  Each model's own spread over the same draws comes with it, so the unpaired √(std₁² + std₂²) costs nothing.

`recording_per_image` records the validations inside a block only (a trainer's validator, which also runs
other validations), and `image_arrays` / `images_from_arrays` turn the statistics into flat arrays for an
`.npz` file (no pickle).

Intervals are bootstrap percentiles (2.5 %, 97.5 %) of `resamples` draws from a seeded generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel


@dataclass(frozen=True)
class ImageStats:
    """One val image as the validator scored it."""

    name: str
    tp: np.ndarray  # (predictions, 10) bool: correct at IoU 0.50, 0.55, ..., 0.95
    conf: np.ndarray
    pred_cls: np.ndarray
    target_cls: np.ndarray


class BootstrapResult(BaseModel):
    estimate: float  # on the val set as it is
    std: float
    ci_low: float
    ci_high: float
    images: int
    resamples: int


class PairedBootstrapResult(BootstrapResult):
    """`estimate`, `std` and the interval are of first − second; each model's own figures over the same draws."""

    first_estimate: float
    second_estimate: float
    first_std: float
    second_std: float


def record_per_image(validator, sink: list[ImageStats]) -> None:
    """Make an Ultralytics DetectionValidator append every image's statistics to `sink` as it scores it."""
    metrics = validator.metrics
    update = metrics.update_stats

    def update_and_record(stat: dict) -> None:
        sink.append(ImageStats(name=str(stat["im_name"]), tp=np.asarray(stat["tp"]).copy(),
                               conf=np.asarray(stat["conf"]).copy(), pred_cls=np.asarray(stat["pred_cls"]).copy(),
                               target_cls=np.asarray(stat["target_cls"]).copy()))
        update(stat)

    metrics.update_stats = update_and_record


@contextlib.contextmanager
def recording_per_image(validator) -> Iterator[list[ImageStats]]:
    """`record_per_image` for the validations run inside the block only; yields the list it fills."""
    metrics = validator.metrics
    before = metrics.__dict__.get("update_stats")  # an instance attribute: someone else is recording too
    sink: list[ImageStats] = []
    record_per_image(validator, sink)
    try:
        yield sink
    finally:
        if before is None:
            del metrics.update_stats  # the class's own method shows again
        else:
            metrics.update_stats = before


def image_arrays(images: Sequence[ImageStats], prefix: str) -> dict[str, np.ndarray]:
    """The images' statistics as flat arrays (ragged per image: counts give the boundaries), keys `prefix`_*."""
    preds = [len(i.conf) for i in images]
    return {
        f"{prefix}_names": np.array([i.name for i in images], dtype=str),
        f"{prefix}_tp": np.concatenate([i.tp.reshape(-1, 10) for i in images]) if images else np.zeros((0, 10), bool),
        f"{prefix}_conf": np.concatenate([i.conf for i in images]) if images else np.zeros(0),
        f"{prefix}_pred_cls": np.concatenate([i.pred_cls for i in images]) if images else np.zeros(0),
        f"{prefix}_pred_counts": np.array(preds, dtype=np.int64),
        f"{prefix}_target_cls": np.concatenate([i.target_cls for i in images]) if images else np.zeros(0),
        f"{prefix}_target_counts": np.array([len(i.target_cls) for i in images], dtype=np.int64),
    }


def images_from_arrays(arrays, prefix: str) -> list[ImageStats]:
    """The inverse of `image_arrays` (`arrays` a mapping such as a loaded `.npz`)."""
    pred_ends = np.cumsum(arrays[f"{prefix}_pred_counts"])
    target_ends = np.cumsum(arrays[f"{prefix}_target_counts"])
    tp, conf, pred_cls, target_cls = (arrays[f"{prefix}_{k}"] for k in ("tp", "conf", "pred_cls", "target_cls"))
    images = []
    for index, name in enumerate(arrays[f"{prefix}_names"]):
        p0 = pred_ends[index - 1] if index else 0
        t0 = target_ends[index - 1] if index else 0
        p1, t1 = pred_ends[index], target_ends[index]
        images.append(ImageStats(name=str(name), tp=tp[p0:p1], conf=conf[p0:p1], pred_cls=pred_cls[p0:p1],
                                 target_cls=target_cls[t0:t1]))
    return images


def map50_95(images: Sequence[ImageStats]) -> float:
    """mAP50-95 of these images, computed as the validator computes it (Ultralytics' `ap_per_class`)."""
    from ultralytics.utils.metrics import ap_per_class

    target_cls = np.concatenate([i.target_cls for i in images]) if images else np.zeros(0)
    if not len(target_cls):
        return 0.0
    tp = np.concatenate([i.tp.reshape(-1, 10) for i in images])
    ap = ap_per_class(tp, np.concatenate([i.conf for i in images]), np.concatenate([i.pred_cls for i in images]),
                      target_cls)[5]
    return float(ap.mean()) if len(ap) else 0.0


def bootstrap_map(images: Sequence[ImageStats], *, resamples: int = 1000, seed: int = 0) -> BootstrapResult:
    """The spread of mAP50-95 over val sets drawn with replacement from these images."""
    draws = _draws(len(images), resamples, seed)
    values = np.array([map50_95([images[i] for i in draw]) for draw in draws])
    return _result(map50_95(images), values, len(images))


def paired_bootstrap(
    first: Sequence[ImageStats], second: Sequence[ImageStats], *, resamples: int = 1000, seed: int = 0
) -> PairedBootstrapResult:
    """mAP50-95(first) − mAP50-95(second) over the same resampled images."""
    names_first, names_second = [i.name for i in first], [i.name for i in second]
    if names_first != names_second:
        raise ValueError("a paired bootstrap needs both models scored on the same images in the same order; "
                         f"got {len(names_first)} and {len(names_second)} images that differ")
    draws = _draws(len(first), resamples, seed)
    values = np.array([(map50_95([first[i] for i in draw]), map50_95([second[i] for i in draw])) for draw in draws])
    on_the_set = map50_95(first), map50_95(second)
    difference = _result(on_the_set[0] - on_the_set[1], values[:, 0] - values[:, 1], len(first))
    return PairedBootstrapResult(
        **difference.model_dump(), first_estimate=on_the_set[0], second_estimate=on_the_set[1],
        first_std=float(values[:, 0].std(ddof=1)), second_std=float(values[:, 1].std(ddof=1)),
    )


def _draws(count: int, resamples: int, seed: int) -> np.ndarray:
    if count == 0:
        raise ValueError("no images to resample: evaluate with `per_image` first")
    if resamples < 2:
        raise ValueError(f"a bootstrap needs at least 2 resamples, got {resamples}")
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def _result(estimate: float, values: np.ndarray, images: int) -> BootstrapResult:
    low, high = np.percentile(values, [2.5, 97.5])
    return BootstrapResult(estimate=estimate, std=float(values.std(ddof=1)), ci_low=float(low), ci_high=float(high),
                           images=images, resamples=len(values))
