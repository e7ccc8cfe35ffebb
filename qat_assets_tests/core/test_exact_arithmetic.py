"""exact_fp32: TF32 and autocast off inside, every flag as it was afterwards, also after an error."""

import pytest
import torch

from qat_assets.core.exact_arithmetic import exact_fp32


@pytest.fixture
def tf32_flags():
    """Restores the two TF32 flags by hand: pytest's monkeypatch cannot undo an attribute of torch's cuBLAS module."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_off_inside_and_restored_after_an_error(tf32_flags, tf32):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    benchmark = torch.backends.cudnn.benchmark
    with pytest.raises(KeyError):
        with exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert torch.backends.cudnn.enabled and torch.backends.cudnn.benchmark == benchmark
            raise KeyError("inside")
    assert torch.backends.cudnn.allow_tf32 == tf32 and torch.backends.cuda.matmul.allow_tf32 == tf32


def test_autocast_is_off_inside():
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
        with exact_fp32():
            assert conv(x).dtype == torch.float32
        assert conv(x).dtype == torch.bfloat16
