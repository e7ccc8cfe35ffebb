"""Count the points where the host waits for the device: the measure of "no host syncs in the training step".

Why count on the CPU at all: a GPU kernel launch returns at once, and the host runs ahead queueing work until
something asks for a value. Each such read (`.item()`, `float(t)`, `bool(t)`, `t.tolist()`, an op whose output
size depends on the data, a copy to host memory, `torch.cuda.synchronize`) makes the host wait until the GPU
has drained its queue, and the GPU then idles while the host launches the next kernels. On the CPU nothing
waits, but the same reads happen in the same places, so they can be counted here and on a GPU alike.

How: a TorchDispatchMode sees every ATen call in its scope (forward, and the backward the autograd engine runs
for CPU tensors on the calling thread): `_local_scalar_dense` is what every Python scalar read of a tensor
dispatches to; the ops listed in `DATA_DEPENDENT_OPS` must read the data to size their output. `tolist` and
`numpy` do not dispatch and are patched for the scope, as is `torch.cuda.synchronize`.

Not counted: reads of tensors that PyTorch keeps in host memory on a GPU too (`host_resident`), e.g. the
step counters of optimizers that are neither `capturable` nor `fused` (PyTorch's documented default), which
Adam reads with `.item()` for its bias correction at every step.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output size depends on the values of their input: the host must read the data to allocate it.
DATA_DEPENDENT_OPS = frozenset({
    "aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
    "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor",
})


@dataclass
class HostSync:
    what: str  # the op or method that waited
    module: str  # the innermost calling module outside torch, e.g. "ultralytics.utils.tal"
    line: int


@dataclass
class HostSyncCount:
    syncs: list[HostSync] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.syncs)

    def outside(self, package: str) -> list[HostSync]:
        """The syncs not made by code of `package` (e.g. "ultralytics": its loss and progress bar)."""
        return [sync for sync in self.syncs if not (sync.module == package or sync.module.startswith(package + "."))]

    def by_place(self) -> dict[str, int]:
        """How many syncs each (what, module:line) made, most first."""
        counts: dict[str, int] = {}
        for sync in self.syncs:
            key = f"{sync.what} at {sync.module}:{sync.line}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _sync_here(what: str) -> HostSync:
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        if not (module == __name__ or module == "torch" or module.startswith("torch.")):
            return HostSync(what, module, frame.f_lineno)
        frame = frame.f_back
    return HostSync(what, "?", 0)


class _SyncMode(TorchDispatchMode):
    def __init__(self, count: HostSyncCount, host_resident: Callable[[], Iterable[torch.Tensor]]):
        super().__init__()
        self.count, self.host_resident = count, host_resident

    def _on_host(self, tensor: torch.Tensor) -> bool:
        storage = tensor.untyped_storage().data_ptr()
        return any(storage == other.untyped_storage().data_ptr() for other in self.host_resident())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            if not self._on_host(args[0]):
                self.count.syncs.append(_sync_here("scalar read"))
        elif name in DATA_DEPENDENT_OPS and not (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size")):
            self.count.syncs.append(_sync_here(name))
        elif name == "aten.index.Tensor" and any(
            index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]
        ):
            self.count.syncs.append(_sync_here("boolean-mask indexing"))
        result = func(*args, **kwargs)
        if name in ("aten._to_copy.default", "aten.copy_.default"):
            source, target = (args[0], result) if name == "aten._to_copy.default" else (args[1], args[0])
            if source.device.type != "cpu" and target.device.type == "cpu":
                self.count.syncs.append(_sync_here("copy to host"))
        return result


@contextlib.contextmanager
def count_host_syncs(host_resident: Callable[[], Iterable[torch.Tensor]] = tuple) -> Iterator[HostSyncCount]:
    """Count the host syncs made inside the `with` block. `host_resident()`: the tensors that live in host memory
    on a GPU too (asked at each scalar read: an optimizer creates its state at its first step); reading them
    is not a sync."""
    count = HostSyncCount()
    patched = {}

    def counting(owner, name: str, what: str) -> None:
        original = getattr(owner, name)
        patched[(owner, name)] = original

        def wrapper(*args, **kwargs):
            count.syncs.append(_sync_here(what))
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    counting(torch.Tensor, "tolist", "tolist")
    counting(torch.Tensor, "numpy", "numpy")
    counting(torch.cuda, "synchronize", "torch.cuda.synchronize")
    try:
        with _SyncMode(count, host_resident):
            yield count
    finally:
        for (owner, name), original in patched.items():
            setattr(owner, name, original)


def optimizer_host_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's step counters that PyTorch keeps in host memory on a GPU too (neither `capturable` nor
    `fused`): reading them is no sync. Empty before the optimizer's first step (the state is created then)."""
    counters = []
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for parameter in group["params"]:
            step = optimizer.state.get(parameter, {}).get("step")
            if isinstance(step, torch.Tensor):
                counters.append(step)
    return counters
