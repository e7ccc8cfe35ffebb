"""`qat-ladder`: the whole yolo10n/yolo10s validation ladder against the persistent instance.

Everything it runs is visible in `dagster dev -w workspace.yaml` afterwards: the dataset job; per
variant, a run of its FP start and, as soon as that start is there, a Dagster backfill of its partition
job over every method|seed partition (QAT, QC, verdict, ONNX). The FP runs and the backfills' runs go
through the instance's run queue, so the `gpu` pool bounds heavy steps across all of them, and the
yolo10n partitions fill the slot its short FP start leaves while yolo10s' trains. Then the comparison and
the gate; it ends by printing the comparison and the gate decision.
"""

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, execute_job, reconstructable

from qat_assets.core import layout
from qat_assets.core import cost_model
from qat_assets.core.settings import METHODS, VALIDATION_VARIANTS, VARIANTS, load_settings
from qat_assets.definitions import defs
from qat_assets.defs.variant.partitions import partition_key
from qat_assets.execution.gpu_slots import listed_or_visible_gpus
from qat_assets.execution.heavy_step_slots import default_heavy_step_slots
from qat_assets.execution.warm_server import running_warm_server

INSTANCE_YAML = """\
# Written by qat-ladder. Heavy steps share the `gpu` pool: default_limit of them run at once, chosen for
# this machine when this file was written: the number of GPUs in QAT_GPU_IDS; else the number of visible
# GPUs (the launcher gives each step one of them); else, CPU only, 2 with 2 cores or more (two steps on one thread each get
# more done than one on two), each worker taking cores // default_limit torch threads. Edit default_limit
# to change it: qat-ladder never rewrites this file. With N GPUs: N, and QAT_GPU_IDS (README, "Several GPUs").
concurrency:
  pools:
    default_limit: {default_limit}
    # No op_granularity_run_buffer: a run launched before a slot is free would wait for it in a busy
    # loop (Dagster 1.13's pending-claim check never sleeps; measured 0.5-0.9 of a core per waiting run,
    # taken from the heavy step on a 2-core machine). Held in the run queue, it costs nothing.
  runs:
    # Runs of the jobs tagged qat/heavy_run do one heavy step at a time; launching at most default_limit of
    # them keeps a queued run from being launched between two heavy steps of a running one, only to
    # busy-wait for the slot (defs/automation/jobs.py).
    tag_concurrency_limits:
      - key: qat/heavy_run
        limit: {default_limit}
# The run queue looks for runs to launch every second (default 5 s): a backfill's runs start sooner.
run_queue:
  dequeue_interval_seconds: 1
# Runs that die are noticed (README, "Runs that die"): the daemon fails a run that has not started
# 300 s after launch, or that runs past its `dagster/max_runtime` tag (heavy jobs: by profile), checking
# every 30 s; the `gpu` slot a dead run held is freed 60 s after it ended. A run whose worker process
# dies is failed at once by the code server that launched it.
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  cancel_timeout_seconds: 300
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 60
# Dagster re-executes a failed run only when its job asks (`dagster/max_retries`: the heavy jobs, once, and
# only when no step failed, i.e. its worker died or hung).
run_retries:
  enabled: true
  max_retries: 0
telemetry:
  enabled: false
"""
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
LADDER_TAG = "qat-ladder"
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
# A backfill in these states may still create runs. The values of `DagsterInstance.get_backfill(...).status`:
# Dagster exports that enum only from a private module.
BACKFILL_CREATING_RUNS = {"REQUESTED", "CANCELING", "FAILING"}
POLL_SECONDS = 2.0
# How long a stopping ladder waits for the runs it terminated to end and the daemon to finish its canceled backfills.
STOP_TIMEOUT_S = 180.0
RETERMINATE_S = 10.0
# Dagster's public API for what the UI's "Cancel backfill" and "Terminate" buttons do: a backfill goes
# CANCELING and the daemon cancels it once its runs are done; a queued run is canceled, a started one is sent
# a termination request (its steps are interrupted, its heavy workers stopped) and ends CANCELED.
CANCEL_BACKFILL = ("{name}: cancelPartitionBackfill(backfillId: ${name}) "
                   "{{ __typename ... on PythonError {{ message }} }}")
TERMINATE_RUNS = """terminateRuns(runIds: $runIds, terminatePolicy: SAFE_TERMINATE) {
    __typename
    ... on TerminateRunsResult { terminateRunResults { __typename ... on TerminateRunFailure { message } } }
    ... on PythonError { message }
  }"""


def dataset_job():
    return defs.resolve_job_def("dataset_job")


def decision_job():
    return defs.resolve_job_def("decision_job")


def prepare_instance_home() -> Path:
    """DAGSTER_HOME (default ./.dagster_home), with this machine's pool limit configured on first use."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.is_file():
        config.write_text(INSTANCE_YAML.format(default_limit=default_heavy_step_slots()))
    return home


class HeavyTime:
    """When the heavy workers ran (training and evaluation, not orchestration), from the seconds each reported
    and the time its materialization was logged; and how many were forked from the warm worker server
    rather than started cold. Several run at once when the pool allows, so their seconds add up to more
    than the time they covered."""

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []
        self.warm = self.cold = 0

    def add_run(self, instance: DagsterInstance, run_id: str) -> None:
        for record in instance.get_records_for_run(run_id).records:
            materialization = record.event_log_entry.asset_materialization
            if materialization is None or "wall_time_s" not in materialization.metadata:
                continue
            end = record.event_log_entry.timestamp
            self.intervals.append((end - float(materialization.metadata["wall_time_s"].value), end))
            if materialization.metadata["execution"].value.get("warm_server"):
                self.warm += 1
            else:
                self.cold += 1

    @property
    def worker_seconds(self) -> float:
        return sum(end - start for start, end in self.intervals)

    @property
    def covered_seconds(self) -> float:
        """How long at least one heavy worker was running: the length of the union of their intervals."""
        covered, reached = 0.0, float("-inf")
        for start, end in sorted(self.intervals):
            if end > reached:
                covered += end - max(start, reached)
                reached = end
        return covered

    def summary(self, wall_seconds: float) -> str:
        covered = self.covered_seconds
        idle = wall_seconds - covered
        at_once = f", {self.worker_seconds / covered:.1f} at once on average while any ran" if covered else ""
        return (f"wall time {wall_seconds / 60:.1f} min: heavy workers ran {self.worker_seconds / 60:.1f} worker-min"
                f"{at_once}; no heavy worker ran for {idle / 60:.1f} min ({idle / wall_seconds:.0%}), the Dagster "
                f"and process overhead; {self.warm} heavy steps forked from the warm worker server, "
                f"{self.cold} started cold")


def only_the_gate_check_failed(result) -> bool:
    """A gate that does not pass fails its step through the blocking check: a result, not a broken ladder."""
    failed_steps = {event.step_key for event in result.all_events if event.is_step_failure}
    evaluations = result.get_asset_check_evaluations()
    return failed_steps == {"gate"} and any(not e.passed for e in evaluations) and bool(
        result.asset_materializations_for_node("gate")
    )


def dagster_cli(*commands: tuple[str, ...]) -> list[str]:
    """Run each `dagster ARGS` against this code location (same interpreter and environment), all at once:
    each loads the code location for several seconds first. Their outputs, in order; raises if any failed."""
    processes = [
        subprocess.Popen([sys.executable, "-m", "dagster", *args, "-m", "qat_assets"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in commands
    ]
    outputs = [process.communicate() for process in processes]
    for args, process, (stdout, stderr) in zip(commands, processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(f"`dagster {' '.join(args)}` failed:\n{stdout}{stderr}")
    return [stdout for stdout, _ in outputs]


def submit_partition_backfill(variant: str, keys: list[str]) -> str:
    """Submit a backfill of `variant`'s partition job over `keys`; its id. The instance queues one run per key."""
    (output,) = dagster_cli((
        "job", "backfill", "-j", f"{variant}_partition_job", "--partitions", ",".join(keys), "--noprompt",
        "--tags", json.dumps({LADDER_TAG: "true"}),
    ))
    match = re.search(r"Launched backfill job `([^`]+)`", output)
    if match is None:
        raise RuntimeError(f"`dagster job backfill` printed no backfill id:\n{output}")
    return match.group(1)


def submit_pretrained_runs(run_ids: dict[str, str]) -> None:
    """Queue each variant's FP start under its given run id, all at once: the ladder's longest path is the
    slowest FP start, and one `dagster job launch` after another delayed the last by ~10 s each."""
    dagster_cli(*(
        ("job", "launch", "-j", f"{variant}_pretrained_job", "--run-id", run_id,
         "--tags", json.dumps({LADDER_TAG: "true"}), "--config-json", json.dumps(RUN_CONFIG))
        for variant, run_id in run_ids.items()
    ))


DAEMON_PID_FILE = "qat-ladder-daemon.pid"  # the dagster-daemon a ladder started for this instance


@contextmanager
def run_queue(home: Path) -> Iterator[Callable[[], str | None]]:
    """A `dagster-daemon` for this instance while the ladder runs: its run queue launches the queued FP runs
    and the backfills' runs (each in its own process). Started here only when no daemon is already heartbeating.

    Yields a function that says why the queue stopped (None while it runs), so waiting never hangs.
    """
    daemon_cli = str(Path(sys.executable).parent / "dagster-daemon")
    pid_file = home / DAEMON_PID_FILE
    # liveness-check trusts a heartbeat for minutes after its daemon stopped: a ladder run again soon after
    # another found "Daemon live", started none, and waited forever for its runs to launch. A daemon a ladder
    # started and stopped is known by its pid file; any other heartbeating daemon (`dagster dev`) is used.
    if (subprocess.run([daemon_cli, "liveness-check"], capture_output=True).returncode == 0
            and not stopped_ladder_daemon(pid_file)):
        yield lambda: None
        return
    log_path = home / "qat-ladder-daemon.log"
    with open(log_path, "a") as log:
        # A session of its own: a Ctrl-C in the terminal reaches the daemon (and the runs it launched, which stop
        # through stop_ladder_runs) only through the ladder's own cleanup, in order.
        daemon = subprocess.Popen([daemon_cli, "run", "-m", "qat_assets"], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        pid_file.write_text(str(daemon.pid))
        try:
            yield lambda: None if daemon.poll() is None else f"dagster-daemon exited ({daemon.returncode}); see {log_path}"
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:  # never leave a daemon behind
                daemon.kill()
                daemon.wait()


def stopped_ladder_daemon(pid_file: Path) -> bool:
    """Whether the daemon a ladder started for this instance (its pid in `pid_file`) is gone: then any heartbeat
    of it that liveness-check still accepts is stale."""
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def run_variants(
    instance: DagsterInstance, variants: tuple[str, ...], keys: list[str], with_fp: bool,
    queue_stopped: Callable[[], str | None],
) -> tuple[list, list[str]]:
    """Per variant, its FP run (when `with_fp`), then a backfill of its partitions once that run succeeded.

    Polls until every run finished and no backfill will create more, printing the FP runs' progress and
    each run as it ends; the finished runs, and what failed. If it stops early (an error, Ctrl-C, SIGTERM), it
    cancels its backfills and terminates its runs (stop_ladder_runs) before the exception goes on.
    """
    fp_runs: dict[str, str] = {}
    backfills: dict[str, str] = {}
    finished, failures, reported = [], [], set()
    log_cursors: dict[str, str | None] = {}

    def start_partitions(variant: str) -> None:
        backfills[variant] = submit_partition_backfill(variant, keys)
        print(f"\n=== backfill {backfills[variant]} of {variant}_partition_job: {len(keys)} partitions "
              f"(`dagster dev` lists it under Backfills)", flush=True)

    try:
        if with_fp:
            fp_runs.update({variant: str(uuid.uuid4()) for variant in variants})  # known before, so canceled if need be
            submit_pretrained_runs(fp_runs)
            for variant, run_id in fp_runs.items():
                if instance.get_run_by_id(run_id) is None:
                    raise RuntimeError(f"the {variant} FP run {run_id} was launched, but the instance does not list it")
                log_cursors[run_id] = None
        else:
            for variant in variants:
                start_partitions(variant)
        while True:
            # Backfill states before their runs: a backfill done creating runs has all of them listed below.
            watched = len(backfills)
            creating = [
                b for b in backfills.values() if instance.get_backfill(b).status.value in BACKFILL_CREATING_RUNS
            ]
            runs = [instance.get_run_by_id(run_id) for run_id in fp_runs.values()]
            for backfill_id in backfills.values():
                runs += backfill_runs(instance, backfill_id)
            for variant, run_id in fp_runs.items():  # the FP starts are the long silent stretch: show their epochs
                if run_id not in reported:
                    log_cursors[run_id] = print_run_messages(instance, run_id, log_cursors[run_id], f"{variant} FP")
            for run in runs:
                if run.status not in FINISHED or run.run_id in reported:
                    continue
                reported.add(run.run_id)
                finished.append(run)
                failed_fp = sum(1 for r in finished if r.run_id in fp_runs.values() and r.status != DagsterRunStatus.SUCCESS)
                expected = len(fp_runs) + (len(variants) - failed_fp) * len(keys)
                partition = run.tags.get("dagster/partition")
                label = run_label(run)
                print(f"=== [{len(reported)}/{expected}] {label}: {describe_finished(instance, run)}", flush=True)
                if run.status != DagsterRunStatus.SUCCESS:
                    failures.append(f"{label} (run {run.run_id})")
                elif partition is None:  # an FP start is there: its variant's partitions can run
                    start_partitions(next(v for v, run_id in fp_runs.items() if run_id == run.run_id))
            all_reported = len(reported) == len(runs) and all(r in reported for r in fp_runs.values())
            if not creating and all_reported and len(backfills) == watched:  # none submitted since the states were read
                for variant, backfill_id in backfills.items():
                    created = len(backfill_runs(instance, backfill_id))
                    if created < len(keys):
                        status = instance.get_backfill(backfill_id).status.value
                        failures.append(f"backfill {backfill_id} of {variant}_partition_job: {status} after "
                                        f"{created} of {len(keys)} runs")
                return finished, failures
            stopped = queue_stopped()
            if stopped:
                raise RuntimeError(f"the ladder's runs cannot finish: {stopped}")
            time.sleep(POLL_SECONDS)
    except BaseException:
        stop_ladder_runs(instance, list(fp_runs.values()), list(backfills.values()))
        raise


def backfill_runs(instance: DagsterInstance, backfill_id: str) -> list:
    return list(instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id})))


def describe_finished(instance: DagsterInstance, run) -> str:
    record = instance.get_run_record_by_id(run.run_id)
    seconds = (record.end_time or 0) - (record.start_time or record.end_time or 0)
    status = "ok" if run.status == DagsterRunStatus.SUCCESS else run.status.value
    return f"{status} in {seconds:.0f}s (run {run.run_id})"


def stop_ladder_runs(instance: DagsterInstance, run_ids: list[str], backfill_ids: list[str]) -> None:
    """Cancel the backfills and terminate the runs among `run_ids` and the backfills' runs, through Dagster's
    GraphQL API (the daemon, still running, launched them and finishes the cancellation); wait up to
    STOP_TIMEOUT_S for all of them to end; print how each ended. Further Ctrl-Cs and SIGTERMs only say to wait.

    A run the daemon is launching (STARTING) cannot be terminated yet: the request is repeated every
    RETERMINATE_S for the runs not ended nor CANCELING."""
    def wait_please(signum, frame):
        print("qat-ladder: still stopping its runs", flush=True)

    previous = {signum: signal.signal(signum, wait_please) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        runs = ladder_runs(instance, run_ids, backfill_ids)
        before = {run.run_id: run.status for run in runs}
        live = [run_id for run_id, status in before.items() if status not in FINISHED]
        print(f"\nqat-ladder stopping: canceling {len(backfill_ids)} backfill(s), terminating {len(live)} run(s)",
              flush=True)
        to_cancel, requested_at = list(backfill_ids), float("-inf")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            runs = ladder_runs(instance, run_ids, backfill_ids)
            statuses = {backfill_id: instance.get_backfill(backfill_id).status.value for backfill_id in backfill_ids}
            ending = [run for run in runs if run.status not in FINISHED]
            if (not ending and not set(statuses.values()) & BACKFILL_CREATING_RUNS) or time.monotonic() > deadline:
                break
            to_terminate = [run.run_id for run in ending if run.status != DagsterRunStatus.CANCELING]
            if (to_cancel or to_terminate) and time.monotonic() - requested_at > RETERMINATE_S:
                requested_at = time.monotonic()
                try:
                    print(stop_through_graphql(to_terminate, to_cancel), flush=True)
                    to_cancel = []
                except RuntimeError as exc:
                    print(f"qat-ladder: {exc}", flush=True)
            time.sleep(1.0)
        for backfill_id, status in statuses.items():
            print(f"  backfill {backfill_id}: {status}", flush=True)
        for run in runs:
            print(f"  {run_label(run)} (run {run.run_id}): {how_it_ended(before.get(run.run_id), run.status)}",
                  flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ladder_runs(instance: DagsterInstance, run_ids: list[str], backfill_ids: list[str]) -> list:
    runs = [run for run_id in run_ids if (run := instance.get_run_by_id(run_id)) is not None]
    for backfill_id in backfill_ids:
        runs += backfill_runs(instance, backfill_id)
    return runs


def stop_through_graphql(run_ids: list[str], backfill_ids: list[str]) -> str:
    """Cancel the backfills and terminate the runs with `dagster-graphql` against this instance (it loads the
    code location, some seconds); a line per backfill and per run result."""
    names = [f"backfill{index}" for index in range(len(backfill_ids))]
    parameters = ", ".join(["$runIds: [String!]!", *(f"${name}: String!" for name in names)])
    fields = "\n  ".join([*(CANCEL_BACKFILL.format(name=name) for name in names), TERMINATE_RUNS])
    document = f"mutation Stop({parameters}) {{\n  {fields}\n}}"
    variables = {"runIds": run_ids, **dict(zip(names, backfill_ids))}
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "dagster-graphql"), "-m", "qat_assets", "-t", document,
         "-v", json.dumps(variables)],
        capture_output=True, text=True,
    )
    try:  # the response is the one JSON line among the code server's log lines
        (data,) = [json.loads(line)["data"] for line in completed.stdout.splitlines() if line.startswith("{")]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"`dagster-graphql` could not stop the runs:\n{completed.stdout}{completed.stderr}") from None
    lines = [f"  backfill {backfill_id}: cancel -> {data[name]['__typename']}"
             for name, backfill_id in zip(names, backfill_ids)]
    terminated = data["terminateRuns"]
    results = terminated.get("terminateRunResults", [terminated])
    lines += [f"  run {run_id}: terminate -> {result['__typename']} {result.get('message', '')}".rstrip()
              for run_id, result in zip(run_ids, results)]
    return "\n".join(lines)


def run_label(run) -> str:
    partition = run.tags.get("dagster/partition")
    return f"{run.job_name} {partition}" if partition else run.job_name


def how_it_ended(before: DagsterRunStatus | None, after: DagsterRunStatus) -> str:
    """What happened to a run while the ladder stopped, in words."""
    if before in FINISHED:
        return f"had already ended {before.value}"
    if after not in FINISHED:
        return f"STILL {after.value} after {STOP_TIMEOUT_S:.0f}s: terminate it in the UI"
    if after == DagsterRunStatus.CANCELED:
        return "canceled before it started" if before in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, None) \
            else f"terminated while {before.value}, now CANCELED"
    return f"ended {after.value} while the ladder stopped"


def print_run_messages(instance: DagsterInstance, run_id: str, cursor: str | None, label: str) -> str | None:
    """Print the INFO and higher messages the run's steps logged since `cursor` (its progress lines); the new cursor."""
    connection = instance.get_records_for_run(run_id, cursor=cursor)
    for record in connection.records:
        entry = record.event_log_entry
        if entry.dagster_event is None and entry.level >= logging.INFO and entry.step_key:
            print(f"  [{label}] {entry.user_message}", flush=True)
    return connection.cursor if connection.records else cursor


def seconds_per_image_arg(text: str) -> dict[str, float]:
    """`0.004` for every variant, or `yolo10s=0.006` for one."""
    variant, _, value = text.rpartition("=")
    if variant and variant not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{variant!r} is not one of {', '.join(VARIANTS)}")
    try:
        return {variant or "*": float(value)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SECONDS or VARIANT=SECONDS") from None


def plan_slots(settings, gpus: int | None) -> tuple[int, str]:
    """How many heavy steps the plan assumes at once, and why."""
    if gpus:
        return gpus, "--gpus"
    listed = listed_or_visible_gpus()
    if listed:
        return len(listed), f"GPUs {','.join(listed)} (QAT_GPU_IDS, else the visible ones)"
    if settings.profile == "coco":
        return 1, "no GPU visible here: planned for one"
    return default_heavy_step_slots(), "this machine's default pool limit (CPU only)"


def planned_precision(settings) -> str:
    """The training precision the steps will run at, as resolved on this machine's device (measured epochs
    must match it). fp16 or bf16 asked for a device this machine lacks are taken as asked: the steps' machine
    has it, or they fail at once there."""
    from qat_assets.core.evaluate import resolve_device
    from qat_assets.core.trainer import resolve_precision

    try:
        return resolve_precision(settings.amp, resolve_device(settings.device))
    except (ValueError, RuntimeError, AssertionError):  # also torch's, for a CUDA device this host has not
        return settings.amp


def print_plan(settings, fp_per_image: dict[str, float], source: str, slots: int, why_slots: str) -> None:
    """The steps `qat-ladder` would run and what they cost (core/cost_model.py), without running anything."""
    home = os.environ.get("DAGSTER_HOME") or str(Path(".dagster_home").absolute())
    root = settings.storage or Path(home) / "artifacts"
    root = root if root.is_dir() else None
    keys = [str(partition_key(m, s)) for m in METHODS for s in settings.seeds]
    data = f"COCO at {settings.coco_root}" if settings.coco_root else "the embedded synthetic set (QAT_COCO_ROOT unset)"
    train, val = cost_model.planned_images(settings)
    print(f"qat-ladder --plan: profile {settings.profile}, seeds {list(settings.seeds)}, {settings.imgsz} px, batch "
          f"{settings.batch}; nothing is run\n\nsteps:")
    print(f"  dataset_job: coco_subset + calibration_subset ({data}: {train:,} train, {val:,} val, "
          f"{settings.calibration_images:,} calibration images)")
    for variant in VALIDATION_VARIANTS:
        fp_from = (f"{settings.checkpoint_dir}/yolov10{variant[-1]}.pt, used as it is" if settings.checkpoint_dir
                   else f"trained here, {settings.pretrain_epochs} epochs")
        print(f"  {variant}_pretrained_job: {variant}/pretrained_checkpoint (FP start: {fp_from})")
        print(f"  {variant}_partition_job x {len(keys)} ({', '.join(keys)}): qat_checkpoint (one training per seed, "
              f"{settings.qat_epochs} epochs, shared by both methods), qc_checkpoint, stability_verdict, onnx_model")
    print("  decision_job: comparison, gate")
    print("  then, only after a passing gate (sensor): the same for yolo10m")

    precision = planned_precision(settings)
    print(f"  training precision: {precision} (QAT_AMP={settings.amp}); only epochs measured at it are used")
    planned = cost_model.stages(settings, VALIDATION_VARIANTS, fp_per_image, source, root, precision=precision)
    after_gate = cost_model.stages(settings, ("yolo10m",), fp_per_image, source, root, precision=precision)
    print(f"\ncost per stage: images x epochs x seconds per image (FP training figures: {source}; QAT "
          f"{cost_model.QAT_OVER_FP}x, QC {cost_model.QC_OVER_FP}x and evaluation {cost_model.EVAL_OVER_FP}x an FP "
          "training image, bench_qat.py's ratios; dataset conversion not counted)")
    for stage in planned + after_gate:
        measured = f"  [{stage.source}]" if stage.source != source else ""
        print(f"  {stage.variant} {stage.name}: {stage.arithmetic()} = {cost_model.hours(stage.seconds)}{measured}")
    for label, chosen in (("yolo10n + yolo10s", planned), ("yolo10m after the gate", after_gate)):
        for n in sorted({1, slots}):
            split = cost_model.split(chosen, n)
            print(f"{label} on {n} slot(s): {cost_model.hours(split.total_seconds)} of work, wall time at least "
                  f"{cost_model.hours(split.wall_seconds)} (longest chain {cost_model.hours(split.longest_chain_seconds)})"
                  + (f"; {n} = {why_slots}" if n == slots and n != 1 else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-ladder", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-foundation", action="store_true", help="reuse the dataset and FP checkpoints")
    parser.add_argument("--plan", action="store_true",
                        help="print the steps it would run and their cost estimate, run nothing (README, 'Cost model')")
    parser.add_argument("--seconds-per-image", type=seconds_per_image_arg, action="append", default=[],
                        metavar="[VARIANT=]SECONDS", help="with --plan: FP training seconds per image to assume")
    parser.add_argument("--gpus", type=int, default=None, help="with --plan: heavy steps at once (GPU slots)")
    args = parser.parse_args(argv)
    if args.plan:
        settings = load_settings()
        override = {k: v for given in args.seconds_per_image for k, v in given.items()}
        fp_per_image, source = cost_model.fp_seconds_per_image(settings, override)
        print_plan(settings, fp_per_image, source, *plan_slots(settings, args.gpus))
        return 0
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the dagster-daemon started here is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    home = prepare_instance_home()
    settings = load_settings()
    print(f"qat-ladder: profile {settings.profile}, seeds {list(settings.seeds)}, instance {home}", flush=True)
    keys = [str(partition_key(m, s)) for m in METHODS for s in settings.seeds]

    failures: list[str] = []
    started = time.time()
    heavy = HeavyTime()
    with DagsterInstance.get() as instance:

        def run_job(label: str, job) -> None:
            print(f"\n=== {label}", flush=True)
            run_started = time.time()
            result = execute_job(
                reconstructable(job), instance=instance, run_config=RUN_CONFIG, raise_on_error=False,
                tags={LADDER_TAG: "true"},
            )
            heavy.add_run(instance, result.run_id)
            gate_result = not result.success and only_the_gate_check_failed(result)
            status = "ok" if result.success else "ok, the gate did not pass" if gate_result else "FAILED"
            print(f"=== {label}: {status} in {time.time() - run_started:.0f}s (run {result.run_id})", flush=True)
            if not result.success and not gate_result:
                failures.append(f"{label} (run {result.run_id})")

        # The daemon starts first, so its start-up (a code server, the first queue check) overlaps the
        # dataset job; it stops before the gate, so a yolo10m sensor left on is not run by the ladder.
        # The warm worker server saves every CPU heavy step its imports; it goes with the daemon.
        warm = nullcontext() if steps_may_use_cuda(settings) else running_warm_server(
            settings.artifact_root(), home / "qat-ladder-warm-workers.log", wait=False
        )
        try:
            with run_queue(home) as queue_stopped, warm:
                if not args.skip_foundation:
                    run_job("dataset", dataset_job)
                if not failures:
                    runs, run_failures = run_variants(
                        instance, VALIDATION_VARIANTS, keys, not args.skip_foundation, queue_stopped
                    )
                    for run in runs:
                        heavy.add_run(instance, run.run_id)
                    failures += run_failures
        except (KeyboardInterrupt, SystemExit) as stop:  # run_variants stopped its runs and said how they ended
            why = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else f"exit {stop.code}"
            print(f"qat-ladder stopped ({why}): no comparison or gate was run; the daemon and the warm worker "
                  "server it started have exited", flush=True)
            return 130 if isinstance(stop, KeyboardInterrupt) else stop.code
        run_job("comparison+gate", decision_job)

    total = time.time() - started
    print_outcome(settings.artifact_root())
    print("\n" + heavy.summary(total))
    print_evidence(settings.artifact_root())
    if failures:
        print("runs that failed (see `dagster dev -w workspace.yaml`):\n  " + "\n  ".join(failures))
        return 1
    return 0


def steps_may_use_cuda(settings) -> bool:
    """Whether heavy steps may run on CUDA: then no warm worker server (launcher.worker_command says why).
    An empty device picks the first GPU if any (counted through NVML: no CUDA context)."""
    if settings.device:
        return settings.device.startswith("cuda")
    return bool(listed_or_visible_gpus())


def print_outcome(root: Path) -> None:
    comparison = layout.comparison_dir(root) / "comparison.json"
    if comparison.is_file():
        from qat_assets.core.comparison import Comparison

        print("\n" + Comparison.from_dict(json.loads(comparison.read_text())).to_markdown())
        print(f"\nfull report: {layout.comparison_dir(root) / 'summary.md'}")
    gate = layout.gate_file(root)
    if gate.is_file():
        from qat_assets.core.gate import GateDecision

        decision = GateDecision.from_dict(json.loads(gate.read_text()))
        print("\n" + decision.headline())
        for reason in decision.reasons:
            print(f"  - {reason}")



def print_evidence(root: Path) -> None:
    """The evidence verdict per variant, as the very last lines: what the run says about the question."""
    gate = layout.gate_file(root)
    if gate.is_file():
        from qat_assets.core.gate import GateDecision

        decision = GateDecision.from_dict(json.loads(gate.read_text()))
        print("\nevidence" + ("" if decision.informative else " (UNINFORMATIVE: the gate's result proves nothing)") + ":")
        for line in decision.evidence_lines():
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
