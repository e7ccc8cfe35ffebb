"""Reading the latest `gate` result: used by the yolo10m sensor and by the gated assets.

The gate passes when its blocking check `gate_passed` passed on its latest materialization; the
reasons come from that materialization's metadata.
"""

from dataclasses import dataclass

from dagster import AssetCheckKey, AssetKey, DagsterInstance, Failure

GATE_KEY = AssetKey("gate")
GATE_PASSED = AssetCheckKey(GATE_KEY, "gate_passed")


@dataclass(frozen=True)
class GateState:
    passed: bool
    reasons: list[str]
    storage_id: int | None  # of the gate materialization; None when the gate never materialized


def latest_materialization_record(instance: DagsterInstance, key: AssetKey):
    records = instance.fetch_materializations(key, limit=1).records
    return records[0] if records else None


def gate_check_passed(instance: DagsterInstance, gate_record) -> bool | None:
    """Whether `gate_passed` passed on the gate materialization `gate_record` (None: not evaluated on it).

    `event_log_storage` is a public attribute of the instance, but this query on it is not in Dagster's
    documented API: 1.13 has no top-level call that reads an asset check's latest result.
    """
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([GATE_PASSED]).get(GATE_PASSED)
    evaluation = record.evaluation if record is not None else None
    if evaluation is None or record.event.timestamp < gate_record.timestamp:
        return None  # not evaluated yet, or the latest evaluation belongs to an older gate
    return bool(evaluation.passed)


def latest_gate(instance: DagsterInstance) -> GateState:
    record = latest_materialization_record(instance, GATE_KEY)
    if record is None:
        return GateState(False, ["gate has never been materialized"], None)
    metadata = record.asset_materialization.metadata
    reasons = list(metadata["reasons"].value) if "reasons" in metadata else ["gate recorded no reasons"]
    passed = gate_check_passed(instance, record)
    if passed is None:
        return GateState(False, [f"the check {GATE_PASSED.name} has no result for the latest gate", *reasons], record.storage_id)
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
