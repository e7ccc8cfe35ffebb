"""What `bn_reestimate_every_eval` adds to a QAT epoch, at a profile's geometry (default: embedded).

Builds the profile's synthetic set, trains a 1-epoch FP start, then runs one QAT trajectory with the setting
on. Each epoch record holds the epoch's seconds (training, both validations and the +BN measurement) and
the +BN measurement's own seconds per copy, so the ratio comes from one run on one machine load:

    overhead = +BN seconds / (epoch seconds - +BN seconds)

    YOLO_OFFLINE=1 .venv/bin/python benchmarks/bench_bn_every_eval.py --profile embedded --variant yolo10n --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

from qat_assets.core.coco import convert_coco_subset  # noqa: E402
from qat_assets.core.pretrain import run_pretrain  # noqa: E402
from qat_assets.core.qat import run_qat  # noqa: E402
from qat_assets.core.requests import PretrainRequest, QATRequest  # noqa: E402
from qat_assets.core.settings import load_settings  # noqa: E402
from qat_assets.core.synthetic import write_synthetic_coco  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="embedded")
    parser.add_argument("--variant", default="yolo10n")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-bn-"))
    base = load_settings({"profile": args.profile, "storage": str(root)}, environ={})
    settings = load_settings({
        "profile": args.profile, "storage": str(root), "pretrain_epochs": 1, "pretrain_lr_hold_epochs": 0,
        "qat_epochs": args.epochs, "bn_reestimate_every_eval": True,
    }, environ={})
    write_synthetic_coco(root / "coco", train_images=base.synthetic_train_images, val_images=base.synthetic_val_images,
                         image_size=base.synthetic_image_size, seed=0)
    subset = convert_coco_subset(root / "coco", root / "subset", train_images=base.train_images,
                                 val_images=base.val_images, seed=0, skip_bad_items=False)
    train_images = base.train_images
    pretrained = run_pretrain(
        PretrainRequest(variant=args.variant, dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
                        names=subset.class_names, train_images=train_images, out_dir=root / "pretrained", settings=settings),
        log=lambda message: None,
    )
    result = run_qat(QATRequest(
        variant=args.variant, method="ema", seed=0, pretrained_checkpoint=pretrained["checkpoint"],
        pretrained_sha256=pretrained["sha256"], dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
        train_images=train_images, out_dir=root / "qat", trajectory_dir=root / "trajectory", settings=settings,
    ), log=print)
    trajectory = json.loads((root / "trajectory" / "history.json").read_text())
    for record in trajectory[1:]:
        bn = record["bn_reestimated"]
        extra = bn["ema"]["seconds"] + bn["live"]["seconds"]
        print(f"epoch {record['epoch']}: epoch {record['seconds']:.1f} s, of which +BN {extra:.1f} s "
              f"(EMA copy {bn['ema']['seconds']:.1f}, live {bn['live']['seconds']:.1f}); "
              f"overhead on the epoch without it {extra / (record['seconds'] - extra):.2f}; "
              f"mAP50-95 EMA {record['map50_95']:.4f} +BN {bn['ema']['map50_95']:.4f}, "
              f"live {record['live']['map50_95']:.4f} +BN {bn['live']['map50_95']:.4f}")
    print(f"QAT stage {result['seconds']:.1f} s; artifacts in {root}")


if __name__ == "__main__":
    main()
