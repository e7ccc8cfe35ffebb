import pytest

from qat_assets.execution.gpu_slots import gpu_slot, gpus_to_share, parse_gpu_ids, visible_gpus


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


def test_visible_gpus_are_cuda_visible_devices_as_cuda_reads_it_else_what_the_driver_counts():
    def four() -> int:
        return 4

    assert visible_gpus({}, count=four) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}, count=four) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8a1e,GPU-77c0"}, count=four) == ["GPU-8a1e", "GPU-77c0"]
    # CUDA stops at the first invalid entry: `-1` and an empty list hide every GPU
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, count=four) == ["1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=four) == []


def test_without_qat_gpu_ids_several_visible_gpus_are_shared_out_one_per_step(tmp_path):
    def two() -> int:
        return 2

    ids, why = gpus_to_share("", "cuda", environ={}, count=two)
    assert ids == ["0", "1"] and "sharing out the 2 visible GPUs" in why
    assert gpus_to_share("", "", environ={}, count=two)[0] == ["0", "1"]  # an empty device picks a GPU too
    # ... and the launcher's lock then gives two steps at once different GPUs
    with gpu_slot(tmp_path, ids) as first, gpu_slot(tmp_path, ids) as second:
        assert {first, second} == {"0", "1"}


def test_what_is_not_shared_out():
    def two() -> int:
        return 2

    def no_driver_call() -> int:
        raise AssertionError("a CPU step asked the driver")

    assert gpus_to_share("", "cpu", environ={}, count=no_driver_call) == ([], "the device is 'cpu'")
    assert gpus_to_share("0,1", "cpu", environ={}, count=no_driver_call)[0] == []
    assert gpus_to_share("1,3", "cuda", environ={}, count=two) == (["1", "3"], "QAT_GPU_IDS=1,3")
    ids, why = gpus_to_share("", "cuda:1", environ={}, count=two)  # the user named a GPU: every step runs there
    assert ids == [] and "names one GPU" in why
    assert gpus_to_share("", "cuda", environ={"CUDA_VISIBLE_DEVICES": "3"}, count=two) == ([], "1 GPU visible")
    assert gpus_to_share("", "", environ={}, count=lambda: 0) == ([], "no GPU visible")
