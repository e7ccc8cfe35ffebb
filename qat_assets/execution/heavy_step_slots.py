"""How many heavy steps this machine runs at once, and how many CPU threads each local CPU worker gets then.

The `gpu` pool's limit is the number of heavy steps that run at once. On a machine without a GPU, two
steps with one torch thread each get more done than one step with two: on this repository's 2-core CPU
(`benchmarks/bench_qat.py --imgsz 64 --batch 8`) an FP training step takes 139 ms with 2 threads and 153 ms
with 1, a QAT step 300 ms and 343 ms. The second thread buys 10-14 %; a second step nearly doubles the
throughput (one step at a time, the ladder's heavy steps used 115 % of the 2 cores on average).
"""

from __future__ import annotations

import os

from qat_assets.execution.gpu_slots import listed_or_visible_gpus


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or taskset's share), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_heavy_step_slots() -> int:
    """The `gpu` pool limit for this machine: one heavy step per GPU listed in QAT_GPU_IDS, else one per
    visible GPU (the launcher shares them out, gpu_slots.gpus_to_share); without a GPU, 2 when the machine
    has at least 2 cores (see the module docstring), else 1.

    May import torch to count GPUs (only where an NVIDIA device node exists): call it where torch may be
    loaded (qat-ladder does, once, when it writes a new dagster.yaml), not while the code location loads.
    """
    gpu_ids = listed_or_visible_gpus()
    if gpu_ids:
        return len(gpu_ids)
    return 2 if available_cores() >= 2 else 1


def cpu_threads_per_step(concurrent_steps: int | None) -> int:
    """torch threads for a CPU worker when up to `concurrent_steps` heavy steps run at once: its share of
    the cores, at least 1. An unknown (None) or zero limit counts as one step at a time."""
    return max(1, available_cores() // max(1, concurrent_steps or 1))
