"""Fold every BatchNorm of a W4A16 YOLO model into the conv before it, keeping the integer weight codes.

Per output channel, with f = gamma / sqrt(var + eps): the conv's weight scale becomes scale * |f|, its bias
beta + (b - mean) * f, and a channel with f < 0 stores its codes negated (the narrow range [-7, 7] is
symmetric, so they stay in range). Same network, same integer grid, one op fewer per conv; the export then
has no BatchNormalization node, which onnxruntime cannot fold itself behind a DequantizeLinear weight.

Ultralytics' own `BaseModel.fuse()` cannot be used on a Brevitas model: `fuse_conv_and_bn` rewrites the
latent float weights and leaves the quantizer's scale as it was, so the codes would change (it rescales only
ModelOpt's `amax`, the same per-channel rescale that is done here for Brevitas' scale parameter).
"""

from __future__ import annotations

import torch
from brevitas.nn import QuantConv2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def learned_scale(conv: QuantConv2d) -> nn.Parameter | None:
    """The quantizer's learned (LSQ-style) scale parameter, or None for a statistics-based scale."""
    value = getattr(conv.weight_quant.tensor_quant.scaling_impl, "value", None)
    return value if isinstance(value, nn.Parameter) else None


def per_channel(conv: QuantConv2d) -> bool:
    return conv.quant_weight().scale.numel() == conv.out_channels


@torch.no_grad()
def fold_bn_into_quant_conv(conv: QuantConv2d, bn: nn.BatchNorm2d, name: str = "conv") -> None:
    """`conv` followed by `bn` becomes `conv` alone, in place; the codes change sign only where gamma < 0."""
    if not per_channel(conv):
        raise ValueError(
            f"{name} has one weight scale for the whole conv; BN folds into per-output-channel scales only "
            "(QAT_PER_CHANNEL_SCALES=true), so keep its BatchNorm"
        )
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    channel = (-1,) + (1,) * (conv.weight.dim() - 1)
    quantized = conv.quant_weight()
    codes, scale = quantized.int().to(conv.weight.dtype), quantized.scale.detach()
    new_scale = scale * factor.abs().view(channel)
    value = learned_scale(conv)
    if value is not None:
        value.mul_(factor.abs().view(value.shape))
    # Latent weights set to code * new scale (as QC's fold does): scaling weights and scale separately would
    # keep weight / scale only up to float rounding and flip codes that sit on a rounding boundary. A
    # statistics-based (max-abs) scale follows these weights by itself.
    conv.weight.copy_(codes * torch.sign(factor).view(channel) * new_scale)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(factor)
    folded_bias = bn.bias + (bias - bn.running_mean) * factor
    if conv.bias is None:
        conv.bias = nn.Parameter(folded_bias, requires_grad=False)
    else:
        conv.bias.copy_(folded_bias)


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> dict[str, str]:
    """Fold the BN of every Ultralytics `Conv` block (act(bn(conv(x)))) into its conv, in place.

    Quantized convs keep their codes (`fold_bn_into_quant_conv`); float convs use torch's exact fold.
    Returns {block name: why its BN was kept} for the blocks that keep one (per-tensor scales).
    """
    from ultralytics.nn.modules.conv import Conv

    kept = {}
    for name, block in model.named_modules():
        bn = getattr(block, "bn", None)
        if not (isinstance(block, Conv) and isinstance(bn, nn.BatchNorm2d)):
            continue
        conv = block.conv
        if isinstance(conv, QuantConv2d):
            if not per_channel(conv):
                kept[name] = "per-tensor weight scale"
                continue
            fold_bn_into_quant_conv(conv, bn, name)
        else:
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        del block.bn
        block.forward = block.forward_fuse
    return kept
