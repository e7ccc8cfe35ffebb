"""Per-image noise of mAP50-95 on the embedded val set, by a bootstrap over val images (issue 21, item 4).

    python scripts/val_map_noise.py FP_DIR [--val-images 64 256] [--resamples 1000] [--work /tmp/val_map_noise]

FP_DIR holds a `pretrained.pt` written by run_pretrain (e.g. `scripts/collapse_probe.py fp`). For each size,
writes the embedded synthetic val set of that many images (each image depends only on the seed and its
index, so the first 64 of 256 are the embedded set's 64), evaluates the model with the project's
evaluation settings, and prints mAP50-95 with its bootstrap std and 95 % interval over resampled images.

With `--ptq`, also the PTQ model (the FP weights quantized as QAT's epoch 0) on the same images, and the
FP − PTQ difference by a paired bootstrap (both models on each resample): two weights of one seed compared
on one val set, as the live and EMA weights are, against the unpaired √(std_FP² + std_PTQ²).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from qat_assets.core.artifacts import read_sidecar
from qat_assets.core.coco import convert_coco_subset
from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.image_bootstrap import bootstrap_map, paired_bootstrap
from qat_assets.core.models import build_detection_model
from qat_assets.core.qat import quant_options
from qat_assets.core.quantize import freeze_quantized_weights, quantize_w4a16
from qat_assets.core.settings import load_settings
from qat_assets.core.synthetic import write_synthetic_coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp_dir", type=Path)
    parser.add_argument("--val-images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/val_map_noise"))
    parser.add_argument("--ptq", action="store_true", help="also the PTQ model and the paired FP - PTQ difference")
    args = parser.parse_args()

    sidecar = read_sidecar(args.fp_dir / "pretrained.pt")
    trained = sidecar["settings"]
    settings = load_settings({"profile": "embedded", "storage": str(args.work)})
    model = build_detection_model(sidecar["variant"], sidecar["names"])
    model.load_state_dict(torch.load(args.fp_dir / "pretrained.pt", map_location="cpu", weights_only=True)["model"])
    models = {"fp": model}
    if args.ptq:
        quantized = copy.deepcopy(model)
        quantize_w4a16(quantized, quant_options(settings))
        models["ptq"] = freeze_quantized_weights(quantized)
    for count in args.val_images:
        coco = args.work / f"synthetic-val{count}"
        if not coco.is_dir():
            write_synthetic_coco(coco, train_images=1, val_images=count, image_size=settings.synthetic_image_size,
                                 seed=settings.subset_seed)
        subset_dir = args.work / f"subset-val{count}"
        subset = convert_coco_subset(coco, subset_dir, train_images=1, val_images=count, seed=settings.subset_seed,
                                     skip_bad_items=False, source="synthetic")
        scored = {}
        for name, evaluated in models.items():
            images: list = []
            metrics = evaluate_model(evaluated, Path(subset.dataset_yaml), imgsz=trained["imgsz"],
                                     batch=trained["batch"], device="cpu", workers=0, work_dir=args.work / f"eval-val{count}",
                                     per_image=images)
            noise = bootstrap_map(images, resamples=args.resamples)
            print(json.dumps({"val_images": count, "model": name, "validator_map50_95": metrics["map50_95"],
                              **noise.model_dump()}), flush=True)
            scored[name] = (images, noise)
        if args.ptq:
            (fp, fp_noise), (ptq, ptq_noise) = scored["fp"], scored["ptq"]
            paired = paired_bootstrap(fp, ptq, resamples=args.resamples)
            print(json.dumps({"val_images": count, "model": "fp - ptq, paired", **paired.model_dump(),
                              "unpaired_std": math.hypot(fp_noise.std, ptq_noise.std)}), flush=True)


if __name__ == "__main__":
    main()
