from dagster import AssetMaterialization, build_sensor_context

from qat_assets.definitions import defs
from qat_assets_tests.dagster_harness import key

sensor = defs.get_sensor_def("yolo10m_after_gate")


def report(instance, path, **metadata):
    instance.report_runless_asset_event(AssetMaterialization(key(path), metadata=metadata))


def tick(instance):
    return sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))


def test_no_gate_and_a_failing_gate_request_nothing_and_say_why(instance):
    result = tick(instance)
    assert not result.run_requests and "never been materialized" in result.skip_message
    report(instance, "gate", passed=False, reasons=["yolo10s/stability_verdict ema|1 is missing"])
    result = tick(instance)
    assert not result.run_requests
    assert "yolo10s/stability_verdict ema|1 is missing" in result.skip_message


def test_a_passing_gate_requests_yolo10m_once_with_keys_tied_to_that_gate(instance):
    report(instance, "gate", passed=True, reasons=["all good"])
    first, again = tick(instance), tick(instance)
    (pretrained,) = first.run_requests
    assert pretrained.job_name == "yolo10m_pretrained_job"
    # The same gate result gives the same run key, which the sensor daemon never launches twice.
    assert [r.run_key for r in again.run_requests] == [pretrained.run_key]

    report(instance, "yolo10m/pretrained_checkpoint")
    partitions = tick(instance).run_requests
    assert sorted(r.partition_key for r in partitions) == ["baseline|0", "baseline|1", "ema|0", "ema|1"]
    assert {r.job_name for r in partitions} == {"yolo10m_partition_job"}
    assert len({r.run_key for r in partitions}) == 4

    report(instance, "gate", passed=True, reasons=["all good again"])
    newer = tick(instance).run_requests
    assert newer[0].run_key != pretrained.run_key  # a new passing gate is a new request


def test_a_gate_that_stops_passing_stops_the_requests(instance):
    report(instance, "gate", passed=True, reasons=[])
    assert tick(instance).run_requests
    report(instance, "gate", passed=False, reasons=["yolo10n/stability_verdict ema|0 (ema+QC) failed: collapsed"])
    assert not tick(instance).run_requests
