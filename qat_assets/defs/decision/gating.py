"""Reading the latest `gate` result: used by the yolo10m sensor and by the gated assets.

The decision is read from the latest gate materialization's own metadata (`passed`, `reasons`), the
same decision its blocking check `gate_passed` carries, written in the same step. It is not read from
the check's latest record: a queued or running gate run plans a new check evaluation, and a run that
is then canceled or fails leaves that planned record as the latest one, with no result, while the
latest materialization still holds a decision. A materialization exists only once the gate decided.
"""

from dataclasses import dataclass

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, Failure

GATE_KEY = AssetKey("gate")
# Where Dagster records a materialization's data version (the value of the `DataVersion` the asset returned).
DATA_VERSION_TAG = "dagster/data_version"


@dataclass(frozen=True)
class GateState:
    passed: bool
    reasons: list[str]
    storage_id: int | None  # of the gate materialization; None when the gate never materialized
    # The gate's data version: a hash of its decision and of the evidence it read (decision/assets.py).
    # Two gate materializations with the same decision on the same evidence share it.
    data_version: str | None


def latest_materialization_record(instance: DagsterInstance, key: AssetKey):
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1).records
    return records[0] if records else None


def latest_gate(instance: DagsterInstance) -> GateState:
    """The decision of the latest gate materialization; never raises on a gate run queued, running,
    canceled or failed (those leave the latest materialization as it was)."""
    record = latest_materialization_record(instance, GATE_KEY)
    if record is None:
        return GateState(False, ["gate has never been materialized"], None, None)
    materialization = record.asset_materialization
    metadata = materialization.metadata
    reasons = list(metadata["reasons"].value) if "reasons" in metadata else ["gate recorded no reasons"]
    # A gate older than its data version records the storage id instead: still one value per materialization.
    version = (materialization.tags or {}).get(DATA_VERSION_TAG) or f"storage-{record.storage_id}"
    decided = metadata.get("passed")
    if decided is None or not isinstance(decided.value, bool):
        reasons = [f"the gate materialization {record.storage_id} records no decision (`passed` metadata)", *reasons]
        return GateState(False, reasons, record.storage_id, version)
    return GateState(decided.value, reasons, record.storage_id, version)


def require_passing_gate(instance: DagsterInstance, asset_label: str) -> GateState:
    state = latest_gate(instance)
    if not state.passed:
        raise Failure(
            description=(
                f"{asset_label} runs only behind a passing gate, and the latest gate did not pass:\n- "
                + "\n- ".join(state.reasons)
            )
        )
    return state
