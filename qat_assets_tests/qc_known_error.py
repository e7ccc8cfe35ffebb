"""QC's known-answer setup: a W4A16 yolov10n at a plateau, a known per-channel error, and how much QC wins back.

Used by `core/test_qc_budget.py` and `benchmarks/qc_budget_sweep.py` (issue 26). The model must be at a
plateau, or the test's premise depends on the CPU: yolov10n trained 80 Adam steps at a constant lr 2e-3 ended
anywhere (W4 calibration loss 6.17 with AVX-512 kernels, 2.49 with AVX2, same code and seeds), and its frozen BN
statistics lagged its weights, so a random "error" sometimes lowered the loss. Here the lr decays linearly to 0
and the BN statistics are re-measured after quantization: the W4 loss was 2.53 (AVX-512) and 2.51 (AVX2), and
SGD on the corrections from there wandered within 2.3-2.7 (a plateau) rather than falling.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.torch_utils import init_seeds

from qat_assets.core.bn_reestimation import reestimate_bn_statistics
from qat_assets.core.qc import (
    QCConfig,
    attach_task_loss,
    build_calibration_loader,
    calibration_loss,
    fold_corrections,
    insert_corrections,
    run_qc,
)
from qat_assets.core.quantize import QuantOptions, quantize_w4a16, quantized_modules

IMGSZ = 64
TRAIN_BATCH = 8


def settled_quantized_model(data_yaml: str, steps: int = 160, seed: int = 0) -> nn.Module:
    """yolov10n trained in float (Adam 2e-3 decayed linearly to 0), quantized to W4A16, BN statistics re-measured."""
    init_seeds(seed)  # every RNG: the loader's shuffle draws from torch, its augmentation from all three
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    attach_task_loss(model)
    loader = build_calibration_loader(data_yaml, model, QCConfig(batch=TRAIN_BATCH, imgsz=IMGSZ))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss, _ = model.loss({**batch, "img": batch["img"].float() / 255})
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    quantize_w4a16(model, QuantOptions())
    # Statistics of the final W4 weights, not an average over weights of the last ~30 steps.
    fixed_order = build_calibration_loader(data_yaml, model, QCConfig(batch=TRAIN_BATCH, imgsz=IMGSZ), shuffle=False)
    reestimate_bn_statistics(model, (batch["img"].float() / 255 for batch in fixed_order), len(fixed_order))
    return model.eval()


def inject_pre_bn_error(model: nn.Module, seed: int, gain_spread: float = 0.3, offset_sigmas: float = 0.3) -> None:
    """h -> g * h + o on every conv followed by a BN, g ~ U(1 - spread, 1 + spread), o ~ N(0, (k * BN std)^2)."""
    names = [name for name, _ in quantized_modules(model) if name.endswith(".conv")]
    insert_corrections(model, names)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            bn = model.get_submodule(name.rpartition(".")[0]).bn
            gain = torch.empty(layer.gamma.shape).uniform_(1 - gain_spread, 1 + gain_spread, generator=generator)
            offset = torch.randn(layer.beta.shape, generator=generator) * offset_sigmas * bn.running_var.sqrt()
            layer.gamma.copy_(gain)
            layer.beta.copy_(offset)
    fold_corrections(model)


def qc_recovery(clean: nn.Module, data_yaml: str, config: QCConfig, error_seed: int) -> dict:
    """Inject the error (seeded) into a copy of `clean`, run QC on it; the calibration losses and the share won back.

    Losses are means over D_c in a fixed order. "after" is the loss of the trained corrections, what QC
    reached, also when its check rejected them (then `rejected` says so and the stage keeps the damaged model).
    """
    loader = build_calibration_loader(data_yaml, clean, config, shuffle=False)
    attach_task_loss(clean)
    clean_loss = calibration_loss(clean, loader, config.device)
    damaged = copy.deepcopy(clean)
    inject_pre_bn_error(damaged, error_seed)
    attach_task_loss(damaged)
    damaged_loss = calibration_loss(damaged, loader, config.device)
    try:
        _, report = run_qc(damaged, data_yaml, config)
    except FloatingPointError:  # the corrections diverged: nothing won back
        return {"clean": clean_loss, "damaged": damaged_loss, "after": float("nan"), "recovered": float("-inf"),
                "rejected": "diverged", "steps": None}
    after = report["check_loss_after"]
    return {
        "clean": clean_loss, "damaged": damaged_loss, "after": after, "before_qc": report["check_loss_before"],
        "recovered": (damaged_loss - after) / (damaged_loss - clean_loss), "rejected": report["rejected"],
        "steps": report["steps"],
    }
