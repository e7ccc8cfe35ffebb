"""The yolo10m sensor against a real instance: gate results reported or materialized, requested runs executed."""

import os
import subprocess
import sys

from dagster import AssetCheckEvaluation, AssetMaterialization, build_sensor_context

from qat_assets.definitions import defs
from qat_assets.defs.automation.sensors import MAX_ATTEMPTS, RUN_KEY_TAG
from qat_assets.defs.decision.gating import DATA_VERSION_TAG, latest_gate
from qat_assets_tests.dagster_harness import data_version, key, run_assets, step_failure_messages
from qat_assets_tests.defs.test_decision import HEALTHY, prepare_runs
from qat_assets_tests.defs.test_gating import home_instance  # noqa: F401 (a fixture)

sensor = defs.get_sensor_def("yolo10m_after_gate")
PARTITIONS = ["baseline|0", "baseline|1", "ema|0", "ema|1"]


def report_gate(instance, passed, reasons, version=None):
    """A gate materialization (its decision, and its data version: by default one per decision) and its
    blocking check's result, as the gate asset records them."""
    version = version or f"{passed}-{'|'.join(reasons)}"
    instance.report_runless_asset_event(AssetMaterialization(
        key("gate"), metadata={"passed": passed, "reasons": reasons}, tags={DATA_VERSION_TAG: version},
    ))
    instance.report_runless_asset_event(AssetCheckEvaluation(asset_key=key("gate"), check_name="gate_passed", passed=passed))


class Daemon:
    """Ticks the sensor as the daemon does: the cursor carried over, each new run key launched once, for real."""

    def __init__(self, instance):
        self.instance, self.cursor, self.launched = instance, None, {}

    def tick(self):
        result = sensor.evaluate_tick(build_sensor_context(instance=self.instance, definitions=defs, cursor=self.cursor))
        self.cursor = result.cursor
        return result

    def launch(self, requests):
        for request in requests:
            if request.run_key in self.launched:
                continue  # the daemon skips run keys it already launched
            job = defs.resolve_job_def(request.job_name)
            self.launched[request.run_key] = job.execute_in_process(
                instance=self.instance, partition_key=request.partition_key, raise_on_error=False,
                tags={**request.tags, RUN_KEY_TAG: request.run_key},
            )

    def succeed(self, request):
        """The run of `request` succeeds: a cheap successful run (coco_subset) with the tags the daemon gives it
        stands in for training yolo10m (the sensor reads only the outcome of the runs it requested)."""
        stand_in = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=self.instance, asset_selection=[key("coco_subset")],
            tags={**request.tags, RUN_KEY_TAG: request.run_key},
        )
        assert stand_in.success
        self.launched[request.run_key] = stand_in


def test_a_failing_gate_never_starts_yolo10m(storage, instance):
    daemon = Daemon(instance)
    assert "never been materialized" in daemon.tick().skip_message
    run_assets(instance, ["gate"])  # a real gate on a fresh instance: its blocking check fails
    for _ in range(2):
        result = daemon.tick()
        assert not result.run_requests
        assert "yolo10n/stability_verdict ema|0 is missing" in result.skip_message
    report_gate(instance, True, [])
    report_gate(instance, False, ["yolo10n/stability_verdict ema|0 (ema+QC) failed: collapsed"])
    assert not daemon.tick().run_requests  # a gate that stops passing stops the requests


def test_a_passing_gate_starts_yolo10m_once(storage, instance):
    daemon = Daemon(instance)
    report_gate(instance, True, ["all good"])
    first, again = daemon.tick(), daemon.tick()
    (pretrained,) = first.run_requests
    assert pretrained.job_name == "yolo10m_pretrained_job"
    assert [r.run_key for r in again.run_requests] == [pretrained.run_key]  # one key: launched once


def test_a_failed_yolo10m_run_is_retried_for_the_same_gate_then_given_up(storage, instance):
    daemon = Daemon(instance)
    report_gate(instance, True, ["all good"])
    keys = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        (request,) = daemon.tick().run_requests
        assert request.tags["qat/attempt"] == str(attempt)
        keys.append(request.run_key)
        daemon.launch([request])  # fails for real: coco_subset was never materialized
        assert not daemon.launched[request.run_key].success
    assert len(set(keys)) == MAX_ATTEMPTS
    result = daemon.tick()
    assert not result.run_requests and "gave up" in result.skip_message
    report_gate(instance, True, ["all good"])  # the same decision again: still given up
    assert "gave up" in daemon.tick().skip_message
    report_gate(instance, True, ["passing again"])
    (fresh,) = daemon.tick().run_requests  # a new passing decision starts over
    assert fresh.tags["qat/attempt"] == "1" and fresh.run_key not in keys


def test_partitions_follow_the_fp_checkpoint_of_the_same_gate(storage, instance):
    daemon = Daemon(instance)
    report_gate(instance, True, [])
    (pretrained,) = daemon.tick().run_requests
    daemon.succeed(pretrained)
    partitions = daemon.tick().run_requests
    assert sorted(r.partition_key for r in partitions) == PARTITIONS
    assert {r.job_name for r in partitions} == {"yolo10m_partition_job"}
    assert len({r.run_key for r in partitions}) == 4
    for request in partitions:
        daemon.succeed(request)
    assert "every yolo10m target is materialized" in daemon.tick().skip_message


def test_two_identical_passing_gates_start_yolo10m_once_and_a_changed_decision_again(storage, instance, monkeypatch):
    prepare_runs(storage, instance, HEALTHY, qc_after=0.38)
    daemon = Daemon(instance)
    assert run_assets(instance, ["comparison", "gate"]).success
    first_version = data_version(instance, "gate")
    (pretrained,) = daemon.tick().run_requests
    assert pretrained.tags["qat/gate_version"] == first_version
    daemon.succeed(pretrained)
    partitions = daemon.tick().run_requests
    assert len(partitions) == 4
    for request in partitions[:2]:
        daemon.succeed(request)

    # The same decision on the same evidence (a verdict written again from the same checkpoints): the same data
    # version; nothing starts over, and only the two partitions not yet materialized from this version are
    # requested again, under the keys already launched.
    assert run_assets(instance, ["yolo10n/stability_verdict"], "ema|0").success
    assert run_assets(instance, ["comparison", "gate"]).success
    assert data_version(instance, "gate") == first_version
    assert data_version(instance, "comparison") is not None
    again = daemon.tick().run_requests
    assert sorted(r.run_key for r in again) == sorted(r.run_key for r in partitions[2:])

    # A changed decision (one seed is enough now) is a new version: yolo10m starts again from its FP checkpoint.
    monkeypatch.setenv("QAT_GATE_MIN_SEEDS", "1")
    assert run_assets(instance, ["gate"]).success
    assert latest_gate(instance).passed and data_version(instance, "gate") != first_version
    (restart,) = daemon.tick().run_requests
    assert restart.job_name == "yolo10m_pretrained_job" and restart.run_key != pretrained.run_key


def test_nothing_is_requested_while_a_yolo10m_run_is_in_flight(storage, home_instance):
    instance = home_instance
    daemon = Daemon(instance)
    report_gate(instance, True, [])
    (pretrained,) = daemon.tick().run_requests
    # A real run of the yolo10m FP job, queued by the CLI (no daemon runs, so it stays queued).
    subprocess.run(
        [sys.executable, "-m", "dagster", "job", "launch", "-m", "qat_assets", "-j", "yolo10m_pretrained_job"],
        env=os.environ.copy(), check=True, capture_output=True, timeout=300,
    )
    result = daemon.tick()
    assert not result.run_requests and "yolo10m runs in flight" in result.skip_message
    report_gate(instance, True, ["another decision"])
    assert not daemon.tick().run_requests  # nor for a new decision, whose runs would write the same checkpoints


def test_a_yolo10m_step_behind_a_passing_gate_gets_past_the_gate(storage, instance):
    report_gate(instance, True, [])
    (message,) = step_failure_messages(run_assets(instance, ["yolo10m/pretrained_checkpoint"]))
    assert "gate" not in message and "coco" in message.lower()  # it stops at the missing dataset instead


def test_the_sensor_waits_for_dagsters_run_retry_which_belongs_to_the_same_attempt(storage, instance):
    daemon = Daemon(instance)
    report_gate(instance, True, [])
    (first,) = daemon.tick().run_requests
    daemon.launch([first])  # fails for real: coco_subset was never materialized
    failed = daemon.launched[first.run_key]
    # What Dagster's run-retry daemon marks on a failed run it will re-execute (`add_run_tags` is the instance
    # method it uses, outside Dagster's documented API).
    instance.add_run_tags(failed.run_id, {"dagster/will_retry": "true"})
    result = daemon.tick()
    assert not result.run_requests and "waiting for Dagster's run retry of: pretrained" in result.skip_message
    daemon.succeed(first)  # the retry keeps the run's tags and run key, and succeeds
    partitions = daemon.tick().run_requests
    assert len(partitions) == 4 and {r.tags["qat/attempt"] for r in partitions} == {"1"}
