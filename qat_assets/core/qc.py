"""Quantization Correction (QC; Gupta & Asthana, WACV 2024) for a W4A16-quantized YOLO model.

After QAT, every quantized conv gets a per-output-channel affine correction, h~ = gamma * h + beta with
h = W_q x + b, placed right after the conv and before its BatchNorm (on the conv's output where there is
no BN: the detection-head output convs). gamma and beta start at the identity and are the only trainable
tensors; they are trained with the QAT task loss (YOLOv10's end-to-end detection loss), Adam, for one
epoch over a small calibration set, with every BatchNorm in eval mode so its running statistics never
change. Afterwards the corrections are folded away, so the corrected model costs nothing at inference:

* into the following BN, without touching its running statistics (no division by gamma, so a gamma near
  zero needs no guard): BN(gamma*h + beta) = w*gamma*(h - mu)/s + b + w*(beta + (gamma - 1)*mu)/s with
  s = sqrt(var + eps), i.e. w' = w*gamma and b' = b + w*(beta + (gamma - 1)*mu)/s;
* into a conv without BN: gamma multiplies the per-output-channel weight scale and the latent weights
  (same integer codes, so the quantization grid is preserved; needs gamma > 0 because a scale is
  positive), and the bias becomes gamma*b + beta.

A conv without BN whose weights share one scale (`per_channel_scales=false`: the detection-head output
convs) has no per-channel factor for gamma to go into. Its correction keeps gamma fixed at 1, out of training,
and trains beta alone, which folds exactly into the bias. The alternative, a float per-channel multiplier
kept after the conv, was not chosen: the deliverable would stop being a plain W4A16 model (a float Mul after
the head outputs in the exported graph, parity and the INT4 file; a module and state-dict keys that a freshly
quantized model does not have, so the QC checkpoint would no longer load into one), for 12 of ~100 corrected
convs, whose inputs come from corrected layers and whose offset beta still corrects.

Speed: QC trains a few thousand numbers, so it runs on `freeze_quantized_weights(model)` (plain convs
holding the already fake-quantized weights, no quantizer work per forward), with each frozen BN absorbed
into its correction (one elementwise pass instead of two) and gradients switched off for everything but
gamma and beta; the learned values are then folded into the real quantized model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from brevitas.nn import QuantConv2d
from torch import nn

from qat_assets.core.exact_arithmetic import exact_fp32
from qat_assets.core.quantize import freeze_quantized_weights, quantized_modules

Corrections = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


QC_OPTIMIZERS = ("SGD", "Adam")
# SGD's momentum for QC; a constant because only the optimizer and lr were ever worth tuning here.
QC_SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class QCConfig:
    batch: int
    imgsz: int
    device: str = "cpu"
    epochs: int = 1
    lr: float = 1e-4
    workers: int = 0  # the QC stage passes settings.workers; 0 serves in-process callers (tests, benchmarks)
    optimizer: str = "Adam"  # the paper's; see `make_optimizer` for why the profiles use SGD
    # Seeds torch before the calibration loader is built: Ultralytics' loader seeds its shuffle from
    # torch.initial_seed(), which is random in a fresh process, so QC's batches (and its result) varied
    # between identical runs (up to 0.004 mAP50-95 in two ladders).
    seed: int = 0


class ChannelCorrection(nn.Module):
    """A conv followed by the QC affine: gamma * conv(x) + beta, one gamma and beta per output channel.

    Given the conv's following BN (frozen, so just a per-channel affine z -> a*z + c), the wrapper takes
    that BN over for speed: it holds the conv with the BN fused in, f = a*h + c, and returns
    BN(gamma*h + beta) = gamma*f + a*beta + (1 - gamma)*c, one elementwise pass instead of two. gamma and
    beta keep their meaning either way, so learned values fold the same way.

    `train_gamma=False` keeps gamma at 1 as a buffer, not a parameter: for a conv where only beta folds
    exactly (`fixed_gamma_layers`).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, train_gamma: bool = True):
        super().__init__()
        weight = conv.weight
        gamma = torch.ones(conv.out_channels, device=weight.device, dtype=weight.dtype)
        if train_gamma:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        self.beta = nn.Parameter(torch.zeros(conv.out_channels, device=weight.device, dtype=weight.dtype))
        self.absorbed_bn = bn is not None
        if bn is None:
            self.conv = conv
            return
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            fused = copy.deepcopy(conv)
            fused.weight.mul_(scale.view(-1, 1, 1, 1))
            fused.bias = nn.Parameter(shift + scale * (conv.bias if conv.bias is not None else 0),
                                      requires_grad=False)
        self.conv = fused
        self.register_buffer("bn_scale", scale.detach().clone())
        self.register_buffer("bn_shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = self.beta
        if self.absorbed_bn:
            shift = torch.addcmul(self.bn_shift * (1 - self.gamma), self.bn_scale, self.beta)
        return torch.addcmul(shift.view(1, -1, 1, 1), self.conv(x), self.gamma.view(1, -1, 1, 1))


def _split_name(name: str) -> tuple[str, str]:
    parent_name, _, child_name = name.rpartition(".")
    return parent_name, child_name


def _dfl_conv(model: nn.Module) -> nn.Module | None:
    dfl = getattr(model.model[-1], "dfl", None)
    return getattr(dfl, "conv", None)


def _has_one_weight_scale(conv: nn.Module) -> bool:
    return isinstance(conv, QuantConv2d) and conv.quant_weight().scale.numel() == 1


def fixed_gamma_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The named convs whose correction keeps gamma at 1: no following BN and one weight scale per tensor.

    Such a conv has nowhere to put a per-channel gain without leaving its integer grid (see the module
    docstring); its beta still folds exactly into the bias.
    """
    return [name for name in names
            if _following_bn(model, name) is None and _has_one_weight_scale(model.get_submodule(name))]


def insert_corrections(
    model: nn.Module, layer_names: Sequence[str] | None = None, absorb_bn: bool = False,
    fixed_gamma: Sequence[str] | None = None,
) -> list[str]:
    """Wrap each named conv (default: every quantized conv) in a `ChannelCorrection`, in place.

    Pass `layer_names` for a frozen copy (`freeze_quantized_weights`), whose convs are plain: use the
    names of the quantized model it was made from, and its `fixed_gamma_layers` as `fixed_gamma` (the
    default finds them in `model` itself, which a frozen copy no longer shows). `absorb_bn` lets each
    wrapper take over the frozen BN that follows its conv (replaced by an identity): the fast form for
    training, see `correction_trainee`. Returns the names of the wrapped layers.
    """
    names = list(layer_names) if layer_names is not None else [name for name, _ in quantized_modules(model)]
    if not names:
        raise ValueError("no quantized convs to correct; quantize the model first or pass layer_names")
    fixed = set(fixed_gamma_layers(model, names) if fixed_gamma is None else fixed_gamma)
    dfl_conv = _dfl_conv(model)
    for name in names:
        conv = model.get_submodule(name)
        if conv is dfl_conv:
            raise ValueError(f"{name} is the fixed DFL conv: it is not quantized and gets no correction")
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name} is a {type(conv).__name__}, not a conv (already corrected?)")
        parent_name, child_name = _split_name(name)
        parent = model.get_submodule(parent_name)
        bn = _following_bn(model, name) if absorb_bn else None
        setattr(parent, child_name, ChannelCorrection(conv, bn, train_gamma=name not in fixed))
        if bn is not None:
            parent.bn = nn.Identity()
    return names


def correction_trainee(quantized_model: nn.Module) -> nn.Module:
    """The copy QC trains: quantized weights frozen into plain convs, BNs absorbed, corrections at identity.

    Nothing in it re-quantizes weights, and only gamma/beta are meant to train; its learned corrections
    (`learned_corrections`) fold into `quantized_model` under the same layer names.
    """
    trainee = freeze_quantized_weights(quantized_model)
    names = [name for name, _ in quantized_modules(quantized_model)]
    insert_corrections(trainee, names, absorb_bn=True, fixed_gamma=fixed_gamma_layers(quantized_model, names))
    return trainee


def corrected_layers(model: nn.Module) -> list[tuple[str, ChannelCorrection]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ChannelCorrection)]


def correction_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable gamma and beta (a fixed gamma is a buffer, not among them)."""
    return [p for _, module in corrected_layers(model) for p in (module.gamma, module.beta)
            if isinstance(p, nn.Parameter)]


def learned_corrections(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's (gamma, beta), keyed by the corrected conv's name."""
    return {
        name: (module.gamma.detach().clone(), module.beta.detach().clone())
        for name, module in corrected_layers(model)
    }


def correction_stats(corrections: Corrections | nn.Module) -> list[dict[str, Any]]:
    """Per layer: how far QC moved it from the identity."""
    if isinstance(corrections, nn.Module):
        corrections = learned_corrections(corrections)
    rows = []
    for name, (gamma, beta) in corrections.items():
        rows.append({
            "name": name,
            "channels": int(gamma.numel()),
            "mean_abs_gamma_minus_1": float((gamma - 1).abs().mean()),
            "max_abs_gamma_minus_1": float((gamma - 1).abs().max()),
            "mean_abs_beta": float(beta.abs().mean()),
            "max_abs_beta": float(beta.abs().max()),
        })
    return rows


# --- folding -------------------------------------------------------------------------------------------


def _following_bn(model: nn.Module, name: str) -> nn.BatchNorm2d | None:
    """The BN applied right after this conv, if any: Ultralytics' Conv block computes act(bn(conv(x)))."""
    from ultralytics.nn.modules.conv import Conv

    parent_name, child_name = _split_name(name)
    parent = model.get_submodule(parent_name)
    if isinstance(parent, Conv) and child_name == "conv" and isinstance(parent.bn, nn.BatchNorm2d):
        return parent.bn
    return None


@torch.no_grad()
def _fold_into_bn(bn: nn.BatchNorm2d, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    bn.bias.add_(bn.weight * (beta + (gamma - 1) * bn.running_mean) / std)
    bn.weight.mul_(gamma)


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, gamma: torch.Tensor, beta: torch.Tensor, name: str) -> None:
    if bool((gamma <= 0).any()):
        raise ValueError(
            f"{name}: QC gamma has non-positive entries (min {float(gamma.min()):.3g}); a per-channel weight "
            "scale must stay positive, so this correction cannot be folded into the conv"
        )
    channel = (-1,) + (1,) * (conv.weight.dim() - 1)
    if _has_one_weight_scale(conv):
        # One scale for the whole tensor: the integer grid holds no per-channel gain, only the bias changes.
        if not bool((gamma == 1).all()):
            raise ValueError(
                f"{name}: its weights share one scale, which cannot absorb a per-channel gamma (max |gamma - 1| "
                f"{float((gamma - 1).abs().max()):.3g}); QC keeps gamma at 1 on such convs (fixed_gamma_layers)"
            )
    elif isinstance(conv, QuantConv2d):
        # gamma goes into the per-channel scale, and every integer code must stay as it is. Multiplying
        # latent weights and scale by gamma keeps weight/scale only up to float rounding, which flips
        # codes that sit on a rounding boundary, so the latent weights are set to code * new scale.
        # A learned (LSQ-style) scale is a quantizer parameter and is scaled explicitly; a statistics-based
        # (max-abs) scale follows the snapped weights by itself.
        quantized = conv.quant_weight()
        codes, scale = quantized.int().to(conv.weight.dtype), quantized.scale.detach()
        new_scale = scale * gamma.view(channel)
        scaling = conv.weight_quant.tensor_quant.scaling_impl
        value = getattr(scaling, "value", None)
        if isinstance(value, nn.Parameter):
            value.mul_(gamma.view(value.shape))
        conv.weight.copy_(codes * new_scale)
    else:
        conv.weight.mul_(gamma.view(channel))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros_like(beta), requires_grad=False)
    conv.bias.copy_(gamma * conv.bias + beta)


def fold_corrections(model: nn.Module, corrections: Corrections | None = None) -> nn.Module:
    """Fold QC into the model, in place, leaving no correction modules; returns the model.

    Without `corrections`, the model's own `ChannelCorrection` wrappers are folded and removed. With them
    (as from `learned_corrections` of a frozen, corrected copy), they are folded into this model's convs of
    the same names, which must not be wrapped.
    """
    if corrections is None:
        if any(module.absorbed_bn for _, module in corrected_layers(model)):
            raise ValueError("this model's corrections absorbed their BNs (a QC trainee): fold its "
                             "learned_corrections into the quantized model it was made from instead")
        corrections = learned_corrections(model)
        for name, module in corrected_layers(model):
            parent_name, child_name = _split_name(name)
            setattr(model.get_submodule(parent_name), child_name, module.conv)
    for name, (gamma, beta) in corrections.items():
        conv = model.get_submodule(name)
        if isinstance(conv, ChannelCorrection):
            raise ValueError(f"{name} still carries a correction module; fold it with corrections=None")
        gamma, beta = gamma.to(conv.weight), beta.to(conv.weight)
        bn = _following_bn(model, name)
        if bn is not None:
            _fold_into_bn(bn, gamma, beta)
        else:
            _fold_into_conv(conv, gamma, beta, name)
    return model


def _raw_predictions(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The head's undecoded box and class outputs (every branch), in eval mode."""
    modes = {module: module.training for module in model.modules()}  # restored exactly (e.g. frozen BNs)
    model.eval()
    try:
        with torch.no_grad():
            output = model(images)
    finally:
        for module, training in modes.items():
            module.training = training
    preds = output[1] if isinstance(output, tuple) else output
    branches = preds.values() if "one2one" in preds else [preds]
    return [branch[key] for branch in branches for key in ("boxes", "scores")]


def fold_equivalence(unfolded: nn.Module, folded: nn.Module, images: torch.Tensor) -> float:
    """Largest output difference between two models, relative to the largest output magnitude, per head output.

    Computed in float64 on copies of both models (quantized weights frozen, exactly the values they hold),
    wherever the models are, with autocast off (`exact_fp32`). The two models place gamma differently, so
    each rounds its products differently at every layer: under a GPU's default TF32 convolutions that alone
    reaches 2e-2 (emulated, test_qc.py), and even in IEEE fp32 it reached 1.6e-4 on the test model after
    two QC epochs, above the 1e-4 tolerance, where float64 measured 4e-6, the rounding of the folded
    parameters themselves. A real fold error (one layer's gamma dropped) measures 0.35.
    """
    with exact_fp32():
        outputs = (_raw_predictions(freeze_quantized_weights(unfolded).double(), images.double()),
                   _raw_predictions(freeze_quantized_weights(folded).double(), images.double()))
    worst = 0.0
    for a, b in zip(*outputs, strict=True):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return worst


# What `fold_equivalence` computes in, recorded beside its result.
FOLD_CHECK_PRECISION = "float64, autocast off"


# --- training ------------------------------------------------------------------------------------------


def build_calibration_loader(data_yaml: str, model: nn.Module, config: QCConfig, shuffle: bool = True):
    """Ultralytics dataloader over the `train:` images of a dataset YAML, without augmentation, labels kept."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(data_yaml, autodownload=False, split="train")
    cfg = get_cfg(overrides=dict(task="detect", imgsz=config.imgsz, batch=config.batch, workers=config.workers,
                                 plots=False, amp=False, cache=False))
    stride = max(int(model.stride.max()), 32)
    # mode="val": letterbox only, no mosaic/flip/HSV; the dataset still returns the labels the loss needs.
    dataset = build_yolo_dataset(cfg, data["train"], config.batch, data, mode="val", rect=False, stride=stride)
    return build_dataloader(dataset, batch=config.batch, workers=config.workers, shuffle=shuffle, rank=-1,
                            pin_memory=False, device=config.device)


def _to_device(batch: dict, device: torch.device) -> dict:
    """What DetectionTrainer.preprocess_batch does without multi-scale: tensors to device, images to [0, 1]."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["img"] = batch["img"].float() / 255
    return batch


def attach_task_loss(model: nn.Module) -> None:
    """Give the model the QAT task loss: default Ultralytics gains unless it carries its own training args.

    YOLOv10's E2ELoss mixes its one-to-many and one-to-one losses with a weight that decays over training
    down to `final_o2m`; QC runs after QAT, so it uses the weighting QAT ended with.
    """
    from ultralytics.cfg import get_cfg

    if not all(hasattr(getattr(model, "args", None), gain) for gain in ("box", "cls", "dfl")):
        model.args = get_cfg()
    model.criterion = model.init_criterion()
    if hasattr(model.criterion, "final_o2m"):
        model.criterion.o2m = model.criterion.final_o2m
        model.criterion.o2o = model.criterion.total - model.criterion.o2m


def _freeze_all_but_corrections(model: nn.Module) -> None:
    model.requires_grad_(False)
    for p in correction_parameters(model):
        p.requires_grad_(True)


def _train_mode_with_frozen_bn(model: nn.Module) -> None:
    """Training mode (the head returns raw predictions for the loss) but BN uses, and keeps, running stats."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def calibration_loss(model: nn.Module, dataloader: Iterable, device: str) -> float:
    """Mean task loss per image over the calibration set, BN frozen, no gradients."""
    _train_mode_with_frozen_bn(model)
    total, images = 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            batch = _to_device(batch, torch.device(device))
            loss, _ = model.loss(batch)
            total += float(loss.sum())
            images += batch["img"].shape[0]
    return total / max(images, 1)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """Adam (the paper's choice) or SGD with momentum 0.9.

    Both are offered because the budget decides: on a known injected error at the embedded budget (64 steps),
    SGD at 1e-3 and 3e-3 and Adam at 3e-4 and 1e-3 won back at least half in every cell of the sweep over
    seeds and CPU kernel families, while Adam at the paper's 1e-4 won back about a third: it moves each
    parameter by about lr per step, and 64 steps are not the paper's ~7,400 (docs/qc_budget.md). An earlier
    single-run finding that Adam raised the loss at every lr came from a model that was not at a plateau.
    """
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=QC_SGD_MOMENTUM)
    raise ValueError(f"QC optimizer {name!r} is not one of {QC_OPTIMIZERS}")


def prepare_correction_training(model: nn.Module, lr: float, optimizer: str = "Adam") -> torch.optim.Optimizer:
    """Gradients on gamma/beta only, the QAT task loss attached, BN frozen; returns the optimizer over gamma/beta."""
    params = correction_parameters(model)
    if not params:
        raise ValueError("the model has no corrections; call insert_corrections first")
    _freeze_all_but_corrections(model)
    attach_task_loss(model)
    _train_mode_with_frozen_bn(model)
    return make_optimizer(params, optimizer, lr)


def correction_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    """One optimizer step on gamma/beta for a preprocessed batch; returns the batch's task loss before the step."""
    loss, _ = model.loss(batch)
    loss = loss.sum()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"QC loss is {value}; the corrections diverged")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


def train_corrections(
    model: nn.Module, dataloader: Iterable, config: QCConfig, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """`config.optimizer` on gamma/beta only, `config.epochs` passes over the calibration set; returns loss and timing."""
    device = torch.device(config.device)
    model.to(device)
    optimizer = prepare_correction_training(model, config.lr, config.optimizer)
    loss_before = calibration_loss(model, dataloader, config.device)
    steps, images, started = 0, 0, time.perf_counter()
    for epoch in range(config.epochs):
        for batch in dataloader:
            batch = _to_device(batch, device)
            last_loss = correction_step(model, batch, optimizer)
            steps += 1
            images += batch["img"].shape[0]
        if log is not None:
            log(f"QC epoch {epoch + 1}/{config.epochs}: {steps} steps, last batch loss {last_loss:.4f}")
    train_seconds = time.perf_counter() - started
    loss_after = calibration_loss(model, dataloader, config.device)
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "steps": steps,
        "images": images,
        "epochs": config.epochs,
        "lr": config.lr,
        "optimizer": config.optimizer,
        "train_seconds": train_seconds,
        "seconds_per_image": train_seconds / max(images, 1),
        "parameters": sum(p.numel() for p in optimizer.param_groups[0]["params"]),
    }


def qc_rejection(check_loss_before: float, check_loss_after: float) -> str | None:
    """Why QC's corrections are discarded, or None to keep them: QC must never make the model worse."""
    if check_loss_after > check_loss_before:
        return f"QC rejected: loss rose from {check_loss_before:.4f} to {check_loss_after:.4f}"
    return None


def run_qc(
    quantized_model: nn.Module,
    data_yaml: str,
    config: QCConfig,
    log: Callable[[str], None] | None = None,
    max_fold_difference: float = 1e-4,
    check_yaml: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The whole QC stage on a quantized QAT model (EMA weights loaded): returns it folded, in place, and a report.

    Trains the corrections on a frozen copy, folds the learned values into `quantized_model`, and checks
    on a calibration batch that the folded quantized model reproduces the corrected frozen copy.

    QC never makes the model worse: the task loss on `check_yaml`'s training images (held-out images, outside
    D_c; D_c itself when None) is measured before and after, in a fixed order, and when it rose the
    corrections are discarded: `quantized_model` is returned untouched and the report's `rejected` says why.
    """
    trainee = correction_trainee(quantized_model)
    torch.manual_seed(config.seed)
    loader = build_calibration_loader(data_yaml, trainee, config)
    check_loader = build_calibration_loader(check_yaml or data_yaml, trainee, config, shuffle=False)
    attach_task_loss(trainee.to(config.device))
    check_before = calibration_loss(trainee, check_loader, config.device)  # corrections at the identity
    training = train_corrections(trainee, loader, config, log=log)
    check_after = calibration_loss(trainee, check_loader, config.device)
    check = {
        "check_set": "held-out" if check_yaml else "calibration", "check_images": len(check_loader.dataset),
        "check_loss_before": check_before, "check_loss_after": check_after,
        "rejected": qc_rejection(check_before, check_after),
    }
    corrections = learned_corrections(trainee)
    fixed_gamma = [name for name, module in corrected_layers(trainee) if not isinstance(module.gamma, nn.Parameter)]
    if check["rejected"]:
        if log is not None:
            log(f"{check['rejected']} ({check['check_set']} images); keeping the uncorrected model")
        # Nothing was folded, so the returned model is exactly the uncorrected one (difference 0, not computed).
        return quantized_model, {**training, **check, "layers": len(corrections), "fixed_gamma_layers": fixed_gamma,
                                 "fold_max_relative_difference": 0.0, "fold_check_precision": None,
                                 "corrections": correction_stats(corrections)}
    fold_corrections(quantized_model.to(config.device), corrections)
    images = _to_device(next(iter(loader)), torch.device(config.device))["img"]
    difference = fold_equivalence(trainee, quantized_model, images)
    if not difference < max_fold_difference:
        raise RuntimeError(
            f"folded QC model differs from the corrected model by {difference:.3g} (relative), above "
            f"{max_fold_difference:g}: the fold is wrong, not saving it"
        )
    report = {
        **training,
        **check,
        "layers": len(corrections),
        "fixed_gamma_layers": fixed_gamma,
        "fold_max_relative_difference": difference,
        "fold_check_precision": FOLD_CHECK_PRECISION,
        "corrections": correction_stats(corrections),
    }
    if log is not None:
        log(f"QC: loss {training['loss_before']:.4f} -> {training['loss_after']:.4f}, fold difference {difference:.2e}")
    return quantized_model, report
