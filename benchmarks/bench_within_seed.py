"""What the within-seed bootstrap (core/within_seed.py) costs: the paired bootstrap's CPU time, and the
per-image recording's copies per validation, on generated per-image statistics of a given size.

The statistics are random (the cost depends on their sizes, not on their values): each image has between half
and all of `--predictions` predictions, 7 targets, `--classes` classes. The defaults give the embedded val set
(64 images, 3 classes) and a COCO-sized one (5000 images, 80 classes; fewer resamples, the time is per resample):

    python benchmarks/bench_within_seed.py
    python benchmarks/bench_within_seed.py --images 5000 --classes 80 --resamples 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qat_assets.core.image_bootstrap import ImageStats, map50_95, paired_bootstrap


def generated(rng: np.random.Generator, images: int, predictions: int, classes: int, names=None) -> list[ImageStats]:
    out = []
    for index in range(images):
        count = int(rng.integers(predictions // 2, predictions + 1))
        out.append(ImageStats(
            name=names[index] if names else f"{index}.jpg", tp=rng.random((count, 10)) < 0.1,
            conf=rng.random(count).astype(np.float32), pred_cls=rng.integers(0, classes, count).astype(np.float32),
            target_cls=rng.integers(0, classes, 7).astype(np.float32)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--predictions", type=int, default=300, help="at most, per image (the validator's max_det)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    map50_95(generated(rng, 4, 10, 3))  # imports Ultralytics outside the timing
    ema = generated(rng, args.images, args.predictions, args.classes)
    live = generated(rng, args.images, args.predictions, args.classes, names=[i.name for i in ema])

    started = time.perf_counter()
    map50_95(ema)
    one_map = time.perf_counter() - started
    started = time.perf_counter()
    paired_bootstrap(ema, live, resamples=args.resamples)
    bootstrap = time.perf_counter() - started
    started = time.perf_counter()
    [ImageStats(name=i.name, tp=i.tp.copy(), conf=i.conf.copy(), pred_cls=i.pred_cls.copy(),
                target_cls=i.target_cls.copy()) for i in ema]  # what record_per_image copies per validation
    copies = time.perf_counter() - started
    print(f"{args.images} images x <= {args.predictions} predictions, {args.classes} classes:")
    print(f"  one mAP50-95: {one_map:.3f} s")
    print(f"  paired bootstrap, {args.resamples} resamples: {bootstrap:.1f} s ({bootstrap / args.resamples:.3f} s per "
          f"resample; 1000 resamples {bootstrap / args.resamples * 1000 / 60:.1f} min)")
    print(f"  recording copies per validation: {copies * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
