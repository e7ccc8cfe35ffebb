import os

import pytest

from qat_assets.execution import gpu_slots
from qat_assets.execution.heavy_step_slots import available_cores, cpu_threads_per_step, default_heavy_step_slots


@pytest.fixture
def machine(monkeypatch):
    """A machine with `cores` cores and `cuda_devices` visible GPUs, QAT_GPU_IDS unset."""
    monkeypatch.delenv("QAT_GPU_IDS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def make(cores: int, cuda_devices: int = 0) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(gpu_slots, "cuda_device_count", lambda: cuda_devices)

    return make


def test_listed_gpus_run_one_heavy_step_each(machine, monkeypatch):
    machine(cores=2, cuda_devices=4)
    monkeypatch.setenv("QAT_GPU_IDS", "0,1,3")
    assert default_heavy_step_slots() == 3


def test_without_qat_gpu_ids_every_visible_gpu_runs_one_heavy_step(machine, monkeypatch):
    machine(cores=16, cuda_devices=2)
    assert default_heavy_step_slots() == 2  # the launcher shares both out (test_gpu_slots.py)
    machine(cores=16, cuda_devices=1)
    assert default_heavy_step_slots() == 1
    machine(cores=16, cuda_devices=8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # what this process may use, not what the driver has
    assert default_heavy_step_slots() == 3


def test_a_cpu_only_machine_runs_two_steps_at_once_when_it_has_two_cores(machine):
    machine(cores=2)
    assert default_heavy_step_slots() == 2
    machine(cores=1)
    assert default_heavy_step_slots() == 1


def test_bad_gpu_ids_are_an_error_naming_them(monkeypatch):
    monkeypatch.setenv("QAT_GPU_IDS", "cuda:0")
    with pytest.raises(ValueError, match="QAT_GPU_IDS='cuda:0'"):
        default_heavy_step_slots()


def test_a_cpu_worker_gets_its_share_of_the_cores_and_at_least_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert cpu_threads_per_step(2) == 3
    assert cpu_threads_per_step(4) == 1
    assert cpu_threads_per_step(8) == 1
    assert cpu_threads_per_step(None) == cpu_threads_per_step(0) == 6  # no limit: one step at a time


def test_cores_are_the_ones_this_process_may_use_not_the_hosts(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # e.g. a 2-CPU container on a 64-core host
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7})
    assert available_cores() == 2 and cpu_threads_per_step(2) == 1
