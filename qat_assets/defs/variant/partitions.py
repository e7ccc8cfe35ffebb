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


def method_and_seed(key: str | MultiPartitionKey) -> tuple[str, int]:
    """`ema|0` (or its MultiPartitionKey) -> ("ema", 0)."""
    if not isinstance(key, MultiPartitionKey):
        method, seed = str(key).split("|")
        key = partition_key(method, int(seed))
    dims = key.keys_by_dimension
    return dims["method"], int(dims["seed"])


def partition_key(method: str, seed: int) -> MultiPartitionKey:
    """The key of one method|seed partition; as a string it reads `ema|0` (dimensions in name order)."""
    return MultiPartitionKey({"method": method, "seed": str(seed)})
