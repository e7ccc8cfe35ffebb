"""IEEE arithmetic for checks that compare two models to a tight tolerance (export parity, QC's fold check).

On Ampere and newer GPUs PyTorch runs cuDNN convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`
is True): inputs and weights are rounded to a 10-bit mantissa before the products. Two models that compute the
same function with differently placed factors (a conv with W*gamma against W followed by gamma) then round
differently at every layer, and over YOLO's ~80 layers the outputs drift apart by far more than a fold check's
1e-4 tolerance allows. Autocast (fp16/bf16) does the same with fewer bits. A check run inside `exact_fp32` sees
only the differences the two models really have.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in cuDNN convolutions or cuBLAS matmuls, no autocast; every flag restored on the way out.

    Only the TF32 flags change: cuDNN stays enabled, with its benchmark and determinism settings as they are.
    On the CPU nothing rounds to TF32 anyway, so this costs nothing there. The tensors' own dtype is the
    caller's business: QC's fold check computes in float64 inside it, which no GPU rounds to TF32.
    """
    # Two plain flags, saved and restored by hand: `torch.backends.cudnn.flags` would also reset cuDNN's
    # enabled/benchmark/depthwise settings to its own defaults unless every one is passed.
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
