"""Is the FP reference evaluation equal to the trainer's last validation? (docs/fp_recipe.md)

    python scripts/fp_eval_check.py FP_DIR DATASET_YAML

FP_DIR holds a `pretrained.pt` written by run_pretrain. Prints the trainer's last-epoch metrics next to
the standalone evaluation with Conv+BN fused (as evaluate_model does) and with the fusion switched off.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from qat_assets.core.artifacts import read_sidecar
from qat_assets.core.evaluate import evaluate_model
from qat_assets.core.models import build_detection_model


def main() -> None:
    fp_dir, data_yaml = Path(sys.argv[1]), Path(sys.argv[2])
    sidecar = read_sidecar(fp_dir / "pretrained.pt")
    settings = sidecar["settings"]
    model = build_detection_model(sidecar["variant"], sidecar["names"])
    model.load_state_dict(torch.load(fp_dir / "pretrained.pt", map_location="cpu", weights_only=True)["model"])

    def evaluate() -> dict:
        return evaluate_model(model, data_yaml, imgsz=settings["imgsz"], batch=settings["batch"], device="cpu", workers=0,
                              work_dir=Path(tempfile.mkdtemp()))

    started = time.time()
    fused = evaluate()
    seconds = time.time() - started
    model.fuse = lambda *args, **kwargs: model  # AutoBackend calls model.fuse(); keep Conv and BN apart as training does
    unfused = evaluate()
    trainer = sidecar["history"][-1]
    for key in fused:
        print(f"{key}: trainer {trainer[key]} | standalone fused {fused[key]:.7f} | standalone unfused {unfused[key]:.7f}")
    print(f"standalone (fused) evaluation: {seconds:.1f} s")


if __name__ == "__main__":
    main()
