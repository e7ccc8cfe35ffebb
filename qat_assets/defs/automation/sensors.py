"""The yolo10m sensor: starts the expensive runs behind a gate whose blocking check passed, once per
passing gate, and retries a failed run a bounded number of times.

Why a sensor with a cursor, not a declarative automation condition: the automation condition that
would express this (`all_deps_blocking_checks_passed` & eager, `| execution_failed` for retries)
re-requests a failed partition on every tick with no bound, and a deterministic failure of a GPU job
would then loop forever. The cursor counts attempts per target and per gate result; run keys carry
the gate and the attempt, so the daemon launches each attempt exactly once. (An `asset_sensor` only
wakes up on a new gate materialization, so it could not retry a run that failed later.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dagster import (
    DagsterRunStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from qat_assets.core.settings import METHODS
from qat_assets.defs.decision.gating import latest_gate
from qat_assets.defs.variant.partitions import partition_key

PRETRAINED = "pretrained"
MAX_ATTEMPTS = 3  # per target and passing gate: the first run and two retries
RUN_KEY_TAG = "dagster/run_key"  # set by the sensor daemon on every run it launches from a run key
FAILED = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


@dataclass
class GateCursor:
    """The gate materialization being served and the attempts made for it, per target."""

    gate: int | None = None
    attempts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> GateCursor:
        return cls(**json.loads(text)) if text else cls()

    def dump(self) -> str:
        return json.dumps({"gate": self.gate, "attempts": self.attempts}, sort_keys=True)


def run_key(gate_storage_id: int, target: str, attempt: int) -> str:
    return f"gate-{gate_storage_id}-{target}-attempt{attempt}"


def attempt_outcome(instance, key: str) -> str:
    """`succeeded`, `failed` or `pending` (not launched yet, queued or running) for the run of `key`."""
    runs = instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: key}), limit=1)
    if not runs:
        return "pending"
    if runs[0].status == DagsterRunStatus.SUCCESS:
        return "succeeded"
    return "failed" if runs[0].status in FAILED else "pending"


def build_yolo10m_sensor(seeds: tuple[int, ...], pretrained_job, partition_job):
    partitions = [str(partition_key(method, seed)) for method in METHODS for seed in seeds]

    @sensor(
        name="yolo10m_after_gate", jobs=[pretrained_job, partition_job], minimum_interval_seconds=60,
        description="When the gate's blocking check passed: yolo10m's FP checkpoint, then every method|seed "
        f"partition; a failed run is retried (at most {MAX_ATTEMPTS} attempts per gate result).",
    )
    def yolo10m_after_gate(context: SensorEvaluationContext):
        gate = latest_gate(context.instance)
        if not gate.passed:
            return SensorResult(skip_reason="gate not passing: " + "; ".join(gate.reasons), cursor=context.cursor)
        cursor = GateCursor.parse(context.cursor)
        if cursor.gate != gate.storage_id:
            cursor = GateCursor(gate=gate.storage_id)  # a new passing gate result: start over

        def request(target: str) -> RunRequest | str:
            """The request for `target`'s current attempt, or why there is none (`done`, `gave up`)."""
            attempt = cursor.attempts.get(target, 1)
            outcome = attempt_outcome(context.instance, run_key(gate.storage_id, target, attempt))
            if outcome == "succeeded":
                return "done"
            if outcome == "failed":
                if attempt >= MAX_ATTEMPTS:
                    return "gave up"
                attempt += 1
                context.log.info(f"yolo10m {target}: attempt {attempt - 1} failed, requesting attempt {attempt}")
            cursor.attempts[target] = attempt
            # The same key is re-emitted while the attempt is pending: the daemon launches it once.
            key = run_key(gate.storage_id, target, attempt)
            if target == PRETRAINED:
                return RunRequest(run_key=key, job_name=pretrained_job.name, tags={"qat/attempt": str(attempt)})
            return RunRequest(
                run_key=key, job_name=partition_job.name, partition_key=target, tags={"qat/attempt": str(attempt)}
            )

        pretrained = request(PRETRAINED)
        outcomes = {PRETRAINED: pretrained} if pretrained != "done" else {p: request(p) for p in partitions}
        requests = [r for r in outcomes.values() if isinstance(r, RunRequest)]
        gave_up = sorted(t for t, r in outcomes.items() if r == "gave up")
        if requests:
            return SensorResult(run_requests=requests, cursor=cursor.dump())
        if gave_up:
            reason = f"gave up after {MAX_ATTEMPTS} failed attempts on: {', '.join(gave_up)}; materialize the gate again"
        else:
            reason = "every yolo10m run for this passing gate succeeded"
        return SensorResult(skip_reason=reason, cursor=cursor.dump())

    return yolo10m_after_gate
