"""`method × seed` partitions of the per-variant training assets (keys read `ema|0`).

Both dimensions are static so that `--partition 'ema|0'` works on a brand-new instance; the seeds come
from settings (QAT_SEEDS), so adding one is a setting, not a code change.
"""

from __future__ import annotations

from dagster import MultiPartitionKey, MultiPartitionsDefinition, StaticPartitionsDefinition

from qat_assets.core.settings import METHODS


def run_partitions(seeds: tuple[int, ...]) -> MultiPartitionsDefinition:
    return MultiPartitionsDefinition(
        {"method": StaticPartitionsDefinition(list(METHODS)), "seed": StaticPartitionsDefinition([str(s) for s in seeds])}
    )


def method_and_seed(partition_key: str | MultiPartitionKey) -> tuple[str, int]:
    """`ema|0` (or its MultiPartitionKey) -> ("ema", 0)."""
    if isinstance(partition_key, MultiPartitionKey):
        dims = partition_key.keys_by_dimension
        return dims["method"], int(dims["seed"])
    method, seed = str(partition_key).split("|")
    return method, int(seed)


def partition_key(method: str, seed: int) -> str:
    return f"{method}|{seed}"
