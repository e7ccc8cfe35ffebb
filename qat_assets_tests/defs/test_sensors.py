"""The yolo10m sensor against a real instance: gate results reported or materialized, requested runs executed."""

from dagster import AssetCheckEvaluation, AssetMaterialization, build_sensor_context

from qat_assets.definitions import defs
from qat_assets.defs.automation.sensors import MAX_ATTEMPTS, RUN_KEY_TAG
from qat_assets_tests.dagster_harness import key, run_assets

sensor = defs.get_sensor_def("yolo10m_after_gate")
PARTITIONS = ["baseline|0", "baseline|1", "ema|0", "ema|1"]


def report_gate(instance, passed, reasons):
    """A gate materialization and its blocking check's result, as the gate asset records them."""
    instance.report_runless_asset_event(AssetMaterialization(key("gate"), metadata={"passed": passed, "reasons": reasons}))
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
    report_gate(instance, True, ["passing again"])
    (fresh,) = daemon.tick().run_requests  # a new passing gate result starts over
    assert fresh.tags["qat/attempt"] == "1" and fresh.run_key not in keys


def test_partitions_follow_the_fp_checkpoint_of_the_same_gate(storage, instance):
    daemon = Daemon(instance)
    report_gate(instance, True, [])
    (pretrained,) = daemon.tick().run_requests
    # The sensor reads only the outcome of the run with that key; a cheap successful run (coco_subset)
    # stands in for training a yolo10m FP checkpoint here.
    stand_in = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[key("coco_subset")], tags={RUN_KEY_TAG: pretrained.run_key}
    )
    assert stand_in.success
    partitions = daemon.tick().run_requests
    assert sorted(r.partition_key for r in partitions) == PARTITIONS
    assert {r.job_name for r in partitions} == {"yolo10m_partition_job"}
    assert len({r.run_key for r in partitions}) == 4
