"""The shipped deploy/dagster.yaml against a real PostgreSQL started here: run, event-log and schedule
storage in Postgres, one materialization, one sensor tick, and the `gpu` pool still serializing steps."""

import shutil

import pytest
from dagster import DagsterInstance, build_sensor_context, execute_job, reconstructable

from qat_assets.definitions import defs
from qat_assets_tests.dagster_harness import foundation_job, latest_metadata
from qat_assets_tests.defs.test_sensors import report_gate
from qat_assets_tests.execution.test_pools import step_intervals
from qat_assets_tests.servers import REPO_ROOT, local_postgres


@pytest.fixture
def postgres_instance(tmp_path, monkeypatch):
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.fail("initdb/pg_ctl are not on PATH: install PostgreSQL (apt-get install postgresql; .ci/run does)")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    with local_postgres() as pg:
        for name, value in (("HOST", pg["host"]), ("PORT", pg["port"]), ("USERNAME", pg["user"]),
                            ("PASSWORD", pg["password"]), ("DB", pg["db"])):
            monkeypatch.setenv(f"DAGSTER_PG_{name}", value)
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with DagsterInstance.get() as instance:
            yield instance


def test_runs_events_schedules_and_the_gpu_pool_live_in_postgres(storage, postgres_instance):
    instance = postgres_instance
    storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    assert [type(s).__name__ for s in storages] == ["PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]

    # One materialization run through the multiprocess executor: every step process writes to Postgres,
    # and the two pretrained checkpoints (independent of each other) still run one at a time.
    result = execute_job(reconstructable(foundation_job), instance=instance, raise_on_error=False)
    assert result.success
    (first_start, first_end), (second_start, second_end) = sorted(step_intervals(instance, result.run_id))
    assert second_start >= first_end
    assert latest_metadata(instance, "yolo10n/pretrained_checkpoint")["execution"]["launcher"] == "local"
    assert instance.get_run_by_id(result.run_id).is_success

    # One sensor tick reads the gate's materialization and its passing blocking check back from Postgres
    # and requests yolo10m.
    report_gate(instance, passed=True, reasons=[])
    sensor = defs.get_sensor_def("yolo10m_after_gate")
    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
    assert [r.job_name for r in tick.run_requests] == ["yolo10m_pretrained_job"]
