"""The `gpu` pool of the instance keeps heavy steps from overlapping, through the multiprocess executor, and
sets how many of the cores each CPU worker takes."""

from dagster import DagsterEventType, execute_job, instance_for_test, reconstructable

from qat_assets.execution import heavy_step_slots
from qat_assets_tests.dagster_harness import foundation_job, latest_metadata, run_assets, step_failure_messages

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


def test_two_heavy_steps_of_one_run_never_overlap(storage):
    # Both pretrained checkpoints depend only on coco_subset, so without the pool they would run side by side.
    with instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        result = execute_job(reconstructable(foundation_job), instance=instance, raise_on_error=False)
        assert result.success
        (first_start, first_end), (second_start, second_end) = sorted(step_intervals(instance, result.run_id))
        assert second_start >= first_end


def test_a_cpu_worker_gets_its_share_of_the_cores_among_the_steps_the_pool_lets_run(storage, instance, monkeypatch):
    # Six cores, two steps at once: 3 threads, which neither torch (all 2 cores here) nor Ultralytics
    # (cores - 1) would pick by themselves.
    monkeypatch.setattr(heavy_step_slots.os, "sched_getaffinity", lambda pid: set(range(6)))
    instance.event_log_storage.set_concurrency_slots("gpu", 2)
    result = run_assets(instance, ["coco_subset", "yolo10n/pretrained_checkpoint"])
    assert result.success, step_failure_messages(result)
    assert latest_metadata(instance, "yolo10n/pretrained_checkpoint")["execution"]["cpu_threads"] == 3
    messages = [r.event_log_entry.user_message for r in instance.get_records_for_run(result.run_id).records]
    assert "pretrain: worker gets 3 of 6 CPU cores: 2 heavy steps may run at once (pool 'gpu')" in messages
