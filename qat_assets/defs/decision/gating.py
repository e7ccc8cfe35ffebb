"""Reading the latest `gate` materialization: used by the yolo10m sensor and by the gated assets."""

from dataclasses import dataclass

from dagster import AssetKey, DagsterInstance, Failure

GATE_KEY = AssetKey("gate")


@dataclass(frozen=True)
class GateState:
    passed: bool
    reasons: list[str]
    storage_id: int | None  # of the gate materialization; None when the gate never materialized


def latest_materialization_record(instance: DagsterInstance, key: AssetKey):
    records = instance.fetch_materializations(key, limit=1).records
    return records[0] if records else None


def latest_gate(instance: DagsterInstance) -> GateState:
    record = latest_materialization_record(instance, GATE_KEY)
    if record is None:
        return GateState(False, ["gate has never been materialized"], None)
    metadata = record.asset_materialization.metadata
    passed = bool(metadata["passed"].value) if "passed" in metadata else False
    reasons = list(metadata["reasons"].value) if "reasons" in metadata else ["gate recorded no reasons"]
    return GateState(passed, reasons, record.storage_id)


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
