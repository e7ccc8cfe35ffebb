import pytest

from qat_assets.execution.gpu_slots import gpu_slot, parse_gpu_ids


def test_each_holder_gets_a_different_gpu_until_one_is_released(tmp_path):
    with gpu_slot(tmp_path, ["0", "1"]) as first, gpu_slot(tmp_path, ["0", "1"]) as second:
        assert {first, second} == {"0", "1"}
        with pytest.raises(TimeoutError, match="no free GPU"):
            with gpu_slot(tmp_path, ["0", "1"], wait_seconds=0):
                pass
    with gpu_slot(tmp_path, ["0", "1"]) as again:
        assert again == "0"


def test_no_gpus_means_no_assignment(tmp_path):
    with gpu_slot(tmp_path, []) as gpu:
        assert gpu is None


def test_gpu_ids_are_validated():
    assert parse_gpu_ids(" 0, 2 ") == ["0", "2"]
    with pytest.raises(ValueError, match="QAT_GPU_IDS"):
        parse_gpu_ids("cuda:0")
