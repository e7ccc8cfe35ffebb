"""The gate lookup against a real instance with a real gate run queued, then canceled (no daemon)."""

import os
import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, build_sensor_context

from qat_assets.definitions import defs
from qat_assets.defs.decision.gating import GATE_KEY, latest_gate
from qat_assets_tests.dagster_harness import run_assets, step_failure_messages

MISSING = "yolo10n/stability_verdict ema|0 is missing"


@pytest.fixture
def home_instance(tmp_path, monkeypatch):
    """An instance in its own DAGSTER_HOME, shared with the `dagster` CLI run from the test."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        yield instance


def assert_lookup_and_tick_name_the_gate_reasons(instance):
    state = latest_gate(instance)
    assert state.passed is False and MISSING in "\n".join(state.reasons)
    sensor = defs.get_sensor_def("yolo10m_after_gate")
    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
    assert not tick.run_requests and MISSING in tick.skip_message
    # A yolo10m step launched by hand refuses with the gate's reasons (not an AttributeError).
    result = run_assets(instance, ["yolo10m/pretrained_checkpoint"])
    (message,) = step_failure_messages(result)
    assert "latest gate did not pass" in message and MISSING in message


def test_a_queued_then_canceled_gate_run_leaves_the_last_decision_readable(storage, home_instance):
    instance = home_instance
    run_assets(instance, ["gate"])  # a real gate on a fresh instance: not passed, naming what is missing
    assert_lookup_and_tick_name_the_gate_reasons(instance)

    # A real decision_job run, queued by the CLI; no daemon runs, so it stays QUEUED.
    subprocess.run(
        [sys.executable, "-m", "dagster", "job", "launch", "-m", "qat_assets", "-j", "decision_job"],
        env=os.environ.copy(), check=True, capture_output=True, timeout=300,
    )
    (queued,) = instance.get_runs(RunsFilter(job_name="decision_job"))
    assert queued.status == DagsterRunStatus.QUEUED
    # The premise: the gate check's latest record is now the planned evaluation of the queued run, with
    # no result (the state that broke the lookup). Read through an instance query outside Dagster's
    # documented API, here only to check that the test sets up what it claims to.
    latest_check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [key for key in defs.get_assets_def(GATE_KEY).check_keys if key.name == "gate_passed"]
    )
    (record,) = latest_check.values()
    assert record.run_id == queued.run_id and record.status.value == "PLANNED"
    assert_lookup_and_tick_name_the_gate_reasons(instance)

    # Canceled as the UI cancels a queued run (the run coordinator's cancel): still the last decision.
    assert instance.run_coordinator.cancel_run(queued.run_id)
    assert instance.get_run_by_id(queued.run_id).status == DagsterRunStatus.CANCELED
    assert_lookup_and_tick_name_the_gate_reasons(instance)
