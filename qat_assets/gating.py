"""Reading the latest `gate` materialization: used by the yolo10m sensor and by the gated assets."""

from dataclasses import dataclass

from dagster import AssetKey, DagsterInstance, Failure

GATE_KEY = AssetKey("gate")


@dataclass(frozen=True)
class GateState:
    passed: bool
    reasons: list[str]
    storage_id: int | None  # of the gate materialization; None when the gate never materialized


def latest_gate(instance: DagsterInstance) -> GateState:
    event = instance.get_latest_materialization_event(GATE_KEY)
    if event is None or event.asset_materialization is None:
        return GateState(False, ["gate has never been materialized"], None)
    metadata = event.asset_materialization.metadata
    passed = bool(metadata["passed"].value) if "passed" in metadata else False
    reasons = list(metadata["reasons"].value) if "reasons" in metadata else ["gate recorded no reasons"]
    return GateState(passed, reasons, event.storage_id)


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
