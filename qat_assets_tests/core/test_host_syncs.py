"""The host-sync counter: every kind of read that makes a GPU's host wait counts once; device-side work does not."""

import torch

from qat_assets.core.host_syncs import count_host_syncs, optimizer_host_state


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        float(grad.sum())  # a sync inside the autograd engine's backward
        return grad * 2


def test_each_host_read_counts_once_and_device_work_not_at_all():
    values = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    with count_host_syncs() as none:
        y = (values * 2).relu().sum() + torch.isfinite(values).all()  # all on the device
        y.backward()
    assert len(none) == 0
    with count_host_syncs() as count:
        float(values.detach().sum())
        bool(values.detach().all())
        int(values.detach().argmax())
        values.detach().tolist()
        values.detach().numpy()
        values.detach().nonzero()  # output size depends on the data
        values.detach()[values.detach() > 0]  # so does boolean-mask indexing
        torch.unique(values.detach())
        _ReadsInBackward.apply(values).sum().backward()
    assert len(count) == 9
    assert all(sync.module == __name__ for sync in count.syncs)
    assert len(count.outside(__name__.rpartition(".")[0])) == 0 and len(count.outside("ultralytics")) == 9


def test_reads_of_an_optimizers_host_side_step_counters_are_not_syncs():
    # Adam reads its step counter with .item() at every step; PyTorch keeps it in host memory on a GPU too
    # unless the optimizer is capturable or fused.
    def adam() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        weight = torch.nn.Parameter(torch.ones(3))
        weight.grad = torch.ones(3)
        return weight, torch.optim.Adam([weight], lr=0.1)

    weight, optimizer = adam()
    with count_host_syncs() as counted:
        optimizer.step()
    weight, optimizer = adam()
    # The counters are asked for at each read, so a state the first step creates inside the scope is known too.
    with count_host_syncs(lambda: optimizer_host_state(optimizer)) as excluded:
        optimizer.step()
        optimizer.step()
        float(weight.detach().sum())
    assert len(counted) >= 1 and len(excluded) == 1
