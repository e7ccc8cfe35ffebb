"""BN re-estimation: against its equation, and restoring corrupted statistics of a real yolov10n."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.bn_reestimation import batch_norms, reestimate_bn_statistics


def batches(count: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) * (1 + i) for i in range(count)]


def test_running_statistics_equal_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.1)
    model = nn.Sequential(conv, bn).eval()
    data = batches(4, (6, 3, 8, 8))
    with torch.no_grad():
        outputs = [conv(x) for x in data]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs])
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for o in outputs])

    report = reestimate_bn_statistics(model, iter(data), max_batches=10)
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-5)
    assert report["batches"] == 4 and report["images"] == 24
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored

    reestimate_bn_statistics(model, iter(data), max_batches=2)  # only the first two batches count
    assert torch.allclose(bn.running_mean, means[:2].mean(0), atol=1e-6)


def test_reestimation_restores_the_outputs_of_a_model_whose_statistics_were_corrupted():
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    data = batches(3, (4, 3, 64, 64), seed=1)
    reestimate_bn_statistics(model, iter(data), max_batches=3)  # the statistics these weights should have
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        reference = model(probe)[0]
        generator = torch.Generator().manual_seed(3)
        for _, bn in batch_norms(model):  # what oscillating QAT leaves behind: stale, shifted statistics
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=generator) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.3, 3, generator=generator))
        corrupted = model(probe)[0]
    assert (corrupted - reference).abs().max() > 0.1 * reference.abs().max()

    reestimate_bn_statistics(model, iter(data), max_batches=3)
    with torch.no_grad():
        restored = model(probe)[0]
    assert torch.allclose(restored, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_no_batches_is_a_clear_error_and_leaves_the_statistics_alone():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(0.5)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn_statistics(nn.Sequential(bn), iter([]), max_batches=5)
    assert torch.equal(bn.running_mean, torch.full((2,), 0.5))
