"""Divergence found with one host sync per optimizer step: which values count, and when they are read."""

import pytest
import torch

from qat_assets.core.divergence import GRADIENT, LOSS, DivergenceWatch, nonfinite_gradients
from qat_assets.core.host_syncs import count_host_syncs
from qat_assets.core.trainer import gradients_to_check


@pytest.mark.parametrize("fused", [False, True], ids=["aminmax", "multi-tensor inf-norm"])
def test_a_gradient_counts_as_non_finite_exactly_when_one_of_its_values_is(fused):
    def nonfinite(*gradients):
        flag = nonfinite_gradients(list(gradients), fused=fused)
        return None if flag is None else bool(flag)

    assert nonfinite(torch.tensor([1.0, float("inf"), 0.0])) is True
    assert nonfinite(torch.zeros(3)) is False
    # Huge finite values are no divergence (a sum of squares would overflow them to inf); a NaN anywhere is.
    huge, small = torch.tensor([3e38, -3e38]), torch.tensor([0.5, 0.25])
    assert nonfinite(huge, small) is False
    small[1] = float("nan")
    assert nonfinite(huge, small) is True
    # -inf alone, anywhere in a conv-shaped gradient, beside an empty gradient; nothing to check is None.
    kernel, empty = torch.zeros(4, 3, 3, 3), torch.zeros(0)
    assert nonfinite(kernel, empty) is False
    kernel[2, 1, 0, 2] = float("-inf")
    assert nonfinite(empty, kernel) is True
    assert nonfinite(empty) is None and nonfinite() is None


def test_the_gradients_are_not_checked_under_amp_where_gradscaler_skips_non_finite_steps():
    weight, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert gradients_to_check([weight, unused], torch.amp.GradScaler("cpu", enabled=True)) == []
    assert gradients_to_check([weight, unused], torch.amp.GradScaler("cpu", enabled=False)) == [weight.grad]


def test_losses_fold_on_the_device_and_one_read_per_step_finds_them_first():
    watch = DivergenceWatch()
    nan_loss, finite = torch.tensor(float("nan")), torch.tensor(2.0)
    with count_host_syncs() as adding:
        watch.add_loss(nan_loss)  # a batch between optimizer steps (gradient accumulation)
        watch.add_loss(finite)
    assert len(adding) == 0
    gradients = [torch.tensor([float("inf")])]
    with count_host_syncs() as reading:
        assert watch.read(gradients) == LOSS  # the loss is named first, as the trainer checked it first
    assert len(reading) == 1
    # The flag was reset by the read: now only the gradient, then nothing.
    assert watch.read(gradients) == GRADIENT
    assert watch.read([torch.zeros(2)]) is None


def test_a_loss_already_read_at_the_step_is_not_read_again_at_the_end_of_the_batch_or_epoch():
    watch = DivergenceWatch()
    loss = torch.tensor(1.0)
    watch.add_loss(loss)  # at the optimizer step
    assert watch.read([torch.zeros(2)]) is None
    watch.add_loss(loss)  # on_train_batch_end, same batch
    with count_host_syncs() as end_of_epoch:
        assert watch.read() is None
    assert len(end_of_epoch) == 0
    # A batch after the epoch's last optimizer step is read at the end of the epoch.
    watch.add_loss(torch.tensor(float("-inf")))
    assert watch.read() == LOSS
