"""Runs that die are noticed: a real instance configured as qat-ladder writes it (with short monitoring
intervals), a real `dagster-daemon`, a run's worker process killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from qat_assets.ladder import INSTANCE_YAML
from qat_assets_tests.defs.waiting_location import PID_DIR_ENV

LOCATION = "qat_assets_tests.defs.waiting_location"
POLL_SECONDS = 1
MAX_RUNTIME = 15  # the second run's `dagster/max_runtime`


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def launch(tags: dict | None = None) -> None:
    command = [sys.executable, "-m", "dagster", "job", "launch", "-m", LOCATION, "-j", "waiting_job"]
    subprocess.run(command + (["--tags", json.dumps(tags)] if tags else []), check=True, capture_output=True, timeout=120)


def test_a_run_whose_worker_dies_ends_failed_within_the_monitoring_timeout_and_is_retried(tmp_path, monkeypatch):
    home, pid_dir = tmp_path / "home", tmp_path / "pids"
    home.mkdir(), pid_dir.mkdir()
    config = yaml.safe_load(INSTANCE_YAML.format(default_limit=1))
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    config["run_monitoring"]["poll_interval_seconds"] = POLL_SECONDS  # seconds, not the ladder's 30
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(PID_DIR_ENV, str(pid_dir))
    daemon_cli = str(Path(sys.executable).parent / "dagster-daemon")
    with open(tmp_path / "daemon.log", "w") as log:
        # Its own session, so the daemon, its code server and the run workers it launches are stopped together.
        daemon = subprocess.Popen([daemon_cli, "run", "-m", LOCATION], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        with DagsterInstance.get() as instance:

            def started_run(exclude: set[str]):
                """The newest run of waiting_job not in `exclude`, once its worker wrote its process ids."""
                runs = [r for r in instance.get_runs(RunsFilter(job_name="waiting_job")) if r.run_id not in exclude]
                pids = pid_dir / f"{runs[0].run_id}.pids" if runs else None
                return (runs[0], *map(int, pids.read_text().split())) if pids and pids.is_file() else None

            def status(run_id):
                return instance.get_run_by_id(run_id).status

            # 1. The run worker dies (SIGKILL, as the OOM killer does): FAILED, then re-executed by run retries.
            launch()
            run, worker, _server = wait_for(lambda: started_run(set()), 120, "the first run started")
            assert run.tags["dagster/max_retries"] == "1" and status(run.run_id) == DagsterRunStatus.STARTED
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: status(run.run_id) == DagsterRunStatus.FAILURE, 5 * POLL_SECONDS + 10, "run 1 FAILED")
            print(f"run 1 FAILED {time.monotonic() - killed:.1f} s after its worker was killed")
            retry = wait_for(
                lambda: instance.get_runs(RunsFilter(tags={"dagster/parent_run_id": run.run_id})), 120, "a retry run"
            )[0]
            wait_for(lambda: status(retry.run_id) == DagsterRunStatus.SUCCESS, 120, "the retry succeeded")

            # 2. The run worker and the code server that launched it die together (nothing is left to notice):
            # run monitoring fails the run once it passes its max runtime.
            launch(tags={"dagster/max_runtime": str(MAX_RUNTIME)})
            seen = {run.run_id, retry.run_id}
            run2, worker2, server2 = wait_for(lambda: started_run(seen), 120, "the second run started")
            os.kill(server2, signal.SIGKILL)
            os.kill(worker2, signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(2)
            assert status(run2.run_id) == DagsterRunStatus.STARTED  # what a dead run looked like before
            wait_for(lambda: status(run2.run_id) == DagsterRunStatus.FAILURE, MAX_RUNTIME + 5 * POLL_SECONDS + 15,
                     "run 2 FAILED")
            print(f"run 2 FAILED {time.monotonic() - killed:.1f} s after its worker and code server were killed")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


def test_both_instance_configs_enable_run_monitoring_and_run_retries():
    shipped = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "dagster.yaml").read_text())
    for config in (yaml.safe_load(INSTANCE_YAML.format(default_limit=1)), shipped):
        monitoring = config["run_monitoring"]
        assert monitoring["enabled"] and monitoring["start_timeout_seconds"] > 0 and monitoring["poll_interval_seconds"] > 0
        assert monitoring["free_slots_after_run_end_seconds"] > 0  # a dead run's `gpu` slot comes back
        assert config["run_retries"] == {"enabled": True, "max_retries": 0}  # only the jobs that ask are retried
