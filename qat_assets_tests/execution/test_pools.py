"""The `gpu` pool of the instance keeps heavy steps from overlapping, through the multiprocess executor."""

from dagster import DagsterEventType, execute_job, instance_for_test, reconstructable

from qat_assets.ladder import INSTANCE_YAML, foundation_job

HEAVY_STEPS = ("yolo10n__pretrained_checkpoint", "yolo10s__pretrained_checkpoint")


def step_intervals(instance, run_id):
    starts, ends = {}, {}
    for record in instance.get_records_for_run(run_id).records:
        entry = record.event_log_entry
        if entry.step_key not in HEAVY_STEPS or entry.dagster_event is None:
            continue
        if entry.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.dagster_event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            ends[entry.step_key] = entry.timestamp
    return [(starts[s], ends[s]) for s in HEAVY_STEPS]


def test_the_shipped_instance_config_limits_the_gpu_pool_to_one():
    assert "default_limit: 1" in INSTANCE_YAML


def test_two_heavy_steps_of_one_run_never_overlap(storage):
    # Both pretrained checkpoints depend only on coco_subset, so without the pool they would run side by side.
    with instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        result = execute_job(reconstructable(foundation_job), instance=instance, raise_on_error=False)
        assert result.success
        (first_start, first_end), (second_start, second_end) = sorted(step_intervals(instance, result.run_id))
        assert second_start >= first_end
