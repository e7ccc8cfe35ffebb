import os

from qat_assets.execution.heavy_step_slots import cpu_threads_per_step


def test_a_cpu_worker_gets_its_share_of_the_cores_and_at_least_one(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpu_threads_per_step(2) == 3
    assert cpu_threads_per_step(4) == 1
    assert cpu_threads_per_step(8) == 1
    assert cpu_threads_per_step(None) == cpu_threads_per_step(0) == 6  # no limit: one step at a time
