"""The yolo10m sensor: starts the expensive runs behind a gate whose decision passed, once per gate
decision, and retries a failed run a bounded number of times.

Keyed on the gate's data version, a hash of its decision and of the evidence it read: a gate
materialized again on the same evidence has the same version, so the sensor does not start over and
the run keys (which carry the version) are ones the daemon has already launched. A target is
requested only when no run for this version materialized it, and nothing is requested while a
yolo10m run is in flight (for this version or an older one, whose runs would write the same checkpoints).

Why a sensor with a cursor, not a declarative automation condition: the automation condition that
would express this (`all_deps_blocking_checks_passed` & eager, `| execution_failed` for retries)
re-requests a failed partition on every tick with no bound, and a deterministic failure of a GPU job
would then loop forever. The cursor counts attempts per target and per gate version; run keys carry
the version and the attempt, so the daemon launches each attempt exactly once. (An `asset_sensor` only
wakes up on a new gate materialization, so it could not retry a run that failed later.)

A run whose worker died is retried by Dagster itself (run retries, `dagster/max_retries` on the heavy
jobs, only for failures that are not a step's): the retry keeps the run's tags and run key, so it
belongs to the same attempt here, and the sensor counts the attempt failed only once Dagster will not
retry it again.
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
MAX_ATTEMPTS = 3  # per target and gate version: the first run and two retries
RUN_KEY_TAG = "dagster/run_key"  # set by the sensor daemon on every run it launches from a run key
# Set by Dagster on a failed run when its run-retry daemon is going to re-execute it.
WILL_RETRY_TAG = "dagster/will_retry"
GATE_VERSION_TAG = "qat/gate_version"
TARGET_TAG = "qat/target"
ATTEMPT_TAG = "qat/attempt"
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
IN_FLIGHT = [status for status in DagsterRunStatus if status not in FINISHED]


@dataclass
class GateCursor:
    """The gate version being served and the attempts made for it, per target."""

    gate_version: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> GateCursor:
        data = json.loads(text) if text else {}
        return cls(data.get("gate_version"), data.get("attempts", {}))  # a cursor of another shape starts over

    def dump(self) -> str:
        return json.dumps({"gate_version": self.gate_version, "attempts": self.attempts}, sort_keys=True)


def run_key(gate_version: str, target: str, attempt: int) -> str:
    return f"gate-{gate_version}-{target}-attempt{attempt}"


def attempt_outcome(instance, key: str) -> str:
    """`succeeded`, `failed`, `retrying` (Dagster will re-execute it) or `not launched` for the run of `key`
    (the latest run carrying the key: a Dagster run retry keeps it)."""
    runs = instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: key}), limit=1)
    if not runs:
        return "not launched"
    run = runs[0]
    if run.status == DagsterRunStatus.SUCCESS:
        return "succeeded"
    if run.status in FINISHED:
        return "retrying" if run.tags.get(WILL_RETRY_TAG) == "true" else "failed"
    return "in flight"


def materialized_from(instance, gate_version: str, target: str) -> bool:
    """Whether a run for this gate version materialized `target` (any attempt, any Dagster retry)."""
    return bool(instance.get_runs(
        RunsFilter(tags={GATE_VERSION_TAG: gate_version, TARGET_TAG: target}, statuses=[DagsterRunStatus.SUCCESS]),
        limit=1,
    ))


def build_yolo10m_sensor(seeds: tuple[int, ...], pretrained_job, partition_job):
    partitions = [str(partition_key(method, seed)) for method in METHODS for seed in seeds]
    jobs = [pretrained_job, partition_job]

    @sensor(
        name="yolo10m_after_gate", jobs=jobs, minimum_interval_seconds=60,
        description="When the gate's decision passed: yolo10m's FP checkpoint, then every method|seed partition, "
        f"once per gate decision; a failed run is retried (at most {MAX_ATTEMPTS} attempts per gate decision).",
    )
    def yolo10m_after_gate(context: SensorEvaluationContext):
        instance = context.instance
        gate = latest_gate(instance)
        if not gate.passed:
            return SensorResult(skip_reason="gate not passing: " + "; ".join(gate.reasons), cursor=context.cursor)
        cursor = GateCursor.parse(context.cursor)
        if cursor.gate_version != gate.data_version:
            cursor = GateCursor(gate_version=gate.data_version)  # a new decision, or new evidence: start over
        version = gate.data_version
        in_flight = [run for job in jobs for run in instance.get_runs(RunsFilter(job_name=job.name, statuses=IN_FLIGHT))]
        if in_flight:
            labels = sorted(f"{r.run_id[:8]} ({r.tags.get(TARGET_TAG, r.job_name)})" for r in in_flight)
            return SensorResult(skip_reason=f"yolo10m runs in flight: {', '.join(labels)}", cursor=cursor.dump())

        def request(target: str) -> RunRequest | str:
            """The request for `target`'s current attempt, or why there is none (`done`, `gave up`, `retrying`)."""
            if materialized_from(instance, version, target):
                return "done"
            attempt = cursor.attempts.get(target, 1)
            outcome = attempt_outcome(instance, run_key(version, target, attempt))
            if outcome == "retrying":
                return "retrying"
            if outcome == "failed":
                if attempt >= MAX_ATTEMPTS:
                    return "gave up"
                attempt += 1
                context.log.info(f"yolo10m {target}: attempt {attempt - 1} failed, requesting attempt {attempt}")
            cursor.attempts[target] = attempt
            # A key not launched yet is re-emitted as is: the daemon launches each key once.
            tags = {GATE_VERSION_TAG: version, TARGET_TAG: target, ATTEMPT_TAG: str(attempt)}
            key = run_key(version, target, attempt)
            if target == PRETRAINED:
                return RunRequest(run_key=key, job_name=pretrained_job.name, tags=tags)
            return RunRequest(run_key=key, job_name=partition_job.name, partition_key=target, tags=tags)

        pretrained = request(PRETRAINED)
        outcomes = {PRETRAINED: pretrained} if pretrained != "done" else {p: request(p) for p in partitions}
        requests = [r for r in outcomes.values() if isinstance(r, RunRequest)]
        if requests:
            return SensorResult(run_requests=requests, cursor=cursor.dump())
        waiting = sorted(t for t, r in outcomes.items() if r == "retrying")
        gave_up = sorted(t for t, r in outcomes.items() if r == "gave up")
        if waiting:
            reason = f"waiting for Dagster's run retry of: {', '.join(waiting)}"
        elif gave_up:
            reason = (f"gave up after {MAX_ATTEMPTS} failed attempts on: {', '.join(gave_up)}; fix the cause and "
                      "materialize them by hand (a gate with a new decision or new evidence starts over)")
        else:
            reason = f"every yolo10m target is materialized from gate version {version}"
        return SensorResult(skip_reason=reason, cursor=cursor.dump())

    return yolo10m_after_gate
