"""`qat-ladder` as a user runs it: a real Dagster backfill the instance lists, then the table and the decision."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, execute_job, reconstructable

from qat_assets.execution.warm_client import ping, socket_path
from qat_assets.definitions import defs
from qat_assets.defs.automation.jobs import HEAVY_RUN_TAG
from qat_assets import ladder
from qat_assets.ladder import HeavyTime, decision_job, only_the_gate_check_failed, prepare_instance_home


def test_the_ladder_submits_a_backfill_per_variant_the_instance_lists_and_reports_its_failed_runs(
    storage, tmp_path, monkeypatch
):
    # Without the foundation the partition runs fail fast (no coco_subset): the backfill's mechanics, the
    # exit status and the printed outcome are what is tested here, not training (see defs/test_variant.py).
    home = tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "QAT_SEEDS": "0"}
    ladder = Path(sys.executable).parent / "qat-ladder"
    completed = subprocess.run(
        [str(ladder), "--skip-foundation"], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    output = completed.stdout
    assert completed.returncode == 1, output + completed.stderr
    for variant in ("yolo10n", "yolo10s"):
        assert f"of {variant}_partition_job: 2 partitions" in output
        assert f"{variant}_partition_job baseline|0: FAILURE" in output and f"{variant}_partition_job ema|0: FAILURE" in output
    assert "full report:" in output  # the comparison table was printed
    assert "gate NOT PASSED" in output and "yolo10n/stability_verdict ema|0 is missing" in output
    assert "0 heavy steps forked from the warm worker server, 0 started cold" in output
    assert ping(socket_path(storage)) is None and not socket_path(storage).exists()  # its warm server stopped

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 2
        for backfill in backfills:
            runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill.backfill_id}))
            assert sorted(run.tags["dagster/partition"] for run in runs) == ["baseline|0", "ema|0"]
            assert len({run.job_name for run in runs}) == 1
            assert all(run.status == DagsterRunStatus.FAILURE for run in runs)
        assert {run.job_name for run in instance.get_runs()} >= {"yolo10n_partition_job", "yolo10s_partition_job"}


def test_each_variants_partitions_wait_for_its_own_fp_run_and_a_failed_one_starts_none(storage, tmp_path):
    # Corrupt user checkpoints make both FP runs fail at once, after the dataset job succeeded: what is tested
    # is the ladder's path through queued FP runs, not training.
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in ("yolov10n.pt", "yolov10s.pt"):
        (checkpoints / name).write_bytes(b"not a checkpoint")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "QAT_SEEDS": "0", "QAT_PROFILE": "smoke",
           "QAT_CHECKPOINT_DIR": str(checkpoints)}
    ladder = Path(sys.executable).parent / "qat-ladder"
    completed = subprocess.run([str(ladder)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = completed.stdout
    assert completed.returncode == 1, output + completed.stderr
    assert "=== dataset: ok" in output
    assert "yolo10n_pretrained_job: FAILURE" in output and "yolo10s_pretrained_job: FAILURE" in output
    assert "[yolo10n FP] pretrain: starting worker" in output  # the FP runs' messages, as they come
    assert "=== backfill" not in output and "_partition_job" not in output
    assert "gate NOT PASSED" in output


def test_a_gate_that_does_not_pass_is_a_result_not_a_failed_ladder(storage, instance):
    result = execute_job(reconstructable(decision_job), instance=instance, raise_on_error=False)
    assert not result.success  # the blocking check failed the gate's step
    assert only_the_gate_check_failed(result)


def test_the_first_ladder_writes_this_machines_pool_limit_and_never_rewrites_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("QAT_GPU_IDS", "0,1,2")
    assert prepare_instance_home() == home
    with DagsterInstance.get() as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 3
        # as many runs of the one-heavy-step-at-a-time jobs as the pool has slots, and those jobs carry the tag
        assert instance.get_concurrency_config().run_queue_config.tag_concurrency_limits == [
            {"key": HEAVY_RUN_TAG, "limit": 3}
        ]
    for job in ("yolo10n_pretrained_job", "yolo10s_partition_job", "validation_partition_job"):
        assert defs.resolve_job_def(job).tags[HEAVY_RUN_TAG] == "true"

    (home / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 5\n")  # edited by hand
    monkeypatch.delenv("QAT_GPU_IDS")
    prepare_instance_home()
    assert (home / "dagster.yaml").read_text() == "concurrency:\n  pools:\n    default_limit: 5\n"


def test_overhead_is_the_time_no_heavy_worker_ran_when_several_run_at_once():
    heavy = HeavyTime()
    heavy.intervals = [(100.0, 160.0), (130.0, 190.0), (250.0, 280.0)]  # two overlap, then a gap, then one
    assert heavy.worker_seconds == 150.0
    assert heavy.covered_seconds == 120.0
    summary = heavy.summary(wall_seconds=240.0)
    assert "heavy workers ran 2.5 worker-min, 1.2 at once on average while any ran" in summary
    assert "no heavy worker ran for 2.0 min (50%)" in summary


class FakeInstance:
    """The instance calls `run_variants` makes, over runs the test finishes by hand."""

    def __init__(self):
        self.runs, self.backfills, self.canceled = {}, {}, []

    def add_run(self, run_id, job_name, tags=None):
        self.runs[run_id] = SimpleNamespace(run_id=run_id, job_name=job_name, tags=tags or {},
                                            status=DagsterRunStatus.QUEUED)

    def get_run_by_id(self, run_id):
        return self.runs.get(run_id)

    def get_runs(self, filters=None):
        backfill = filters.tags["dagster/backfill"]
        return [run for run in self.runs.values() if run.tags.get("dagster/backfill") == backfill]

    def get_backfill(self, backfill_id):
        return self.backfills[backfill_id]

    def get_run_record_by_id(self, run_id):
        return SimpleNamespace(start_time=0.0, end_time=1.0)

    def get_records_for_run(self, run_id, cursor=None):
        return SimpleNamespace(records=[], cursor=cursor)

    def report_run_canceled(self, run, message):
        run.status = DagsterRunStatus.CANCELED
        self.canceled.append(run.run_id)


def test_a_variants_partitions_start_when_its_own_fp_run_succeeded_not_when_the_other_did(monkeypatch, capsys):
    from qat_assets import ladder

    instance, events = FakeInstance(), []

    fp_ids = {}

    def submit_fp(run_ids):
        assert list(run_ids) == ["yolo10n", "yolo10s"]  # both queued at once
        for variant, run_id in run_ids.items():
            fp_ids[f"fp-{variant}"] = run_id
            instance.add_run(run_id, f"{variant}_pretrained_job")

    def submit_backfill(variant, keys):
        events.append(f"backfill {variant}")
        instance.backfills[f"bf-{variant}"] = SimpleNamespace(status=SimpleNamespace(value="COMPLETED"))
        for key in keys:
            instance.add_run(f"{variant}-{key}", f"{variant}_partition_job",
                             {"dagster/backfill": f"bf-{variant}", "dagster/partition": key})
        return f"bf-{variant}"

    def queue_tick():  # the "daemon": each poll finishes the next run, yolo10n's FP first, yolo10s' FP last
        order = ["fp-yolo10n", "yolo10n-baseline|0", "yolo10n-ema|0", "fp-yolo10s", "yolo10s-baseline|0", "yolo10s-ema|0"]
        pending = [name for name in order if fp_ids.get(name, name) in instance.runs
                   and instance.runs[fp_ids.get(name, name)].status == DagsterRunStatus.QUEUED]
        if pending:
            instance.runs[fp_ids.get(pending[0], pending[0])].status = DagsterRunStatus.SUCCESS
            events.append(f"done {pending[0]}")
        return None

    monkeypatch.setattr(ladder, "submit_pretrained_runs", submit_fp)
    monkeypatch.setattr(ladder, "submit_partition_backfill", submit_backfill)
    monkeypatch.setattr(ladder, "POLL_SECONDS", 0.0)
    runs, failures = ladder.run_variants(instance, ("yolo10n", "yolo10s"), ["baseline|0", "ema|0"], True, queue_tick)
    assert failures == [] and len(runs) == 6
    # yolo10n's partitions were submitted while yolo10s' FP run was still queued.
    assert events.index("backfill yolo10n") < events.index("done fp-yolo10s") < events.index("backfill yolo10s")
    assert "[6/6] yolo10s_partition_job ema|0: ok" in capsys.readouterr().out


def processes_with(variable: str, value: str) -> list[str]:
    """The live processes whose environment sets `variable` to `value` (all a ladder starts inherit its DAGSTER_HOME)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{variable}={value}".encode() in environ:
            found.append(f"{pid}: {command}")
    return found


def interrupt_ladder(home: Path, cwd: Path, args: list[str], when: str, **settings: str) -> str:
    """Run `qat-ladder ARGS` against `home`; once it prints a line containing `when`, press Ctrl-C (SIGINT to
    its whole foreground process group, as a terminal does). Its output; asserts it exited 130, saying so,
    without running the gate, and left no process with its DAGSTER_HOME."""
    env = {**os.environ, "DAGSTER_HOME": str(home), "QAT_SEEDS": "0", **settings}
    ladder = subprocess.Popen(
        [str(Path(sys.executable).parent / "qat-ladder"), *args], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines = []
    for line in ladder.stdout:
        lines.append(line)
        if when in line:
            break
    os.killpg(ladder.pid, signal.SIGINT)
    output = "".join(lines) + ladder.stdout.read()
    assert ladder.wait(timeout=600) == 130, output
    assert "qat-ladder stopped (Ctrl-C)" in output and "=== comparison+gate" not in output, output
    deadline = time.monotonic() + 30  # processes that were exiting when the ladder returned
    while (left := processes_with("DAGSTER_HOME", str(home))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], left  # the daemon, its code server and run workers, the warm server and its children
    return output


def assert_every_run_ended_and_said_how(home: Path, output: str, monkeypatch) -> list:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        runs = list(instance.get_runs())
    assert runs and all(run.status in (DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE,
                                       DagsterRunStatus.SUCCESS) for run in runs), [r.status for r in runs]
    for run in runs:  # the runs the daemon launched for it (the dataset job ran in the ladder's process before)
        if run.job_name != "dataset_job":
            assert f"{run.job_name}{' ' + run.tags['dagster/partition'] if 'dagster/partition' in run.tags else ''} " \
                   f"(run {run.run_id}): " in output, (run.run_id, output[-3000:])
    return runs


def test_a_ladder_stopped_by_ctrl_c_cancels_its_backfills_ends_its_runs_and_leaves_no_process(
    storage, tmp_path, monkeypatch
):
    # Without the foundation the partition runs fail fast: what is tested is the stop, whatever state each
    # run is in when it comes (queued, starting, started or ended).
    home = tmp_path / "home"
    output = interrupt_ladder(home, tmp_path, ["--skip-foundation"], when="of yolo10s_partition_job")
    assert "qat-ladder stopping: canceling 2 backfill(s)" in output, output
    assert_every_run_ended_and_said_how(home, output, monkeypatch)
    with DagsterInstance.get() as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 2
        for backfill in backfills:
            assert backfill.status.value == "CANCELED"
            assert f"backfill {backfill.backfill_id}: CANCELED" in output


def test_a_ladder_stopped_while_an_fp_run_trains_terminates_that_run_and_its_worker(storage, tmp_path, monkeypatch):
    # 50 FP epochs: the run is surely still training when the stop comes.
    home = tmp_path / "home"
    output = interrupt_ladder(home, tmp_path, [], when="[yolo10n FP] pretrain: starting worker",
                              QAT_PROFILE="smoke", QAT_PRETRAIN_EPOCHS="50")
    runs = assert_every_run_ended_and_said_how(home, output, monkeypatch)
    (fp_run,) = [run for run in runs if run.job_name == "yolo10n_pretrained_job"]
    assert fp_run.status == DagsterRunStatus.CANCELED
    assert f"yolo10n_pretrained_job (run {fp_run.run_id}): terminated while STARTED, now CANCELED" in output


def test_plan_prints_the_steps_and_their_cost_and_runs_nothing(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("QAT_PROFILE", "smoke")
    monkeypatch.delenv("QAT_STORAGE", raising=False)

    # --plan resolves the training precision through torch, whose import probes the system (ldconfig, file):
    # imported first, so what the check below catches is a process the plan itself starts.
    import qat_assets.core.trainer  # noqa: F401

    def no_process(*args, **kwargs):
        raise AssertionError(f"--plan started a process: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(ladder, "execute_job", no_process)
    assert ladder.main(["--plan", "--seconds-per-image", "0.5", "--gpus", "2"]) == 0
    output = capsys.readouterr().out
    for step in ("dataset_job", "yolo10n_pretrained_job", "yolo10s_partition_job x 4 (baseline|0, baseline|1, ema|0, ema|1)",
                 "decision_job: comparison, gate"):
        assert step in output
    assert "training precision: off (QAT_AMP=auto)" in output  # resolved on this CPU-only machine
    assert "yolo10n FP start: 1 x (16 x 1 x 0.5 s + 24 x 0.165 s) = 0.2 min" in output
    # 2 variants x (11.96 + 2 x 34.84 + 4 x 64.32) s = 677.84 s; on 2 slots half of it (above the 111 s chain)
    assert "yolo10n + yolo10s on 1 slot(s): 11.3 min of work, wall time at least 11.3 min" in output
    assert "yolo10n + yolo10s on 2 slot(s): 11.3 min of work, wall time at least 5.6 min" in output
    assert not home.exists()  # no instance, no dagster.yaml


def test_a_stopped_ladder_daemon_is_known_by_its_pid_file_so_its_stale_heartbeat_is_not_trusted(tmp_path):
    """A ladder run again within minutes of another found liveness-check's "Daemon live" (the stopped daemon's
    heartbeat), started no daemon and waited forever: the pid file tells a stopped ladder daemon apart."""
    pid_file = tmp_path / ladder.DAEMON_PID_FILE
    assert not ladder.stopped_ladder_daemon(pid_file)  # no ladder daemon: another daemon's heartbeat is trusted
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_file.write_text(str(gone.pid))
    assert ladder.stopped_ladder_daemon(pid_file)
    pid_file.write_text(str(os.getpid()))  # still running: its heartbeat is real
    assert not ladder.stopped_ladder_daemon(pid_file)
