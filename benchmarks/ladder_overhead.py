"""Where the orchestration time of a `qat-ladder` went, read from its instance's event log.

Per run: how long it waited in the run queue (created -> started) and its wall time against the seconds
its heavy workers reported (`wall_time_s`). Per step kind: how long the step process took to start
(multiprocess executor: STEP_WORKER_STARTING -> STEP_WORKER_STARTED; none in process) and a step's own
overhead (its duration minus the worker's reported seconds: worker start-up, imports, Pipes).

    DAGSTER_HOME=/path/of/the/ladder/instance PYTHONPATH=$PWD .venv/bin/python benchmarks/ladder_overhead.py
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from dagster import DagsterEventType, DagsterInstance, RunsFilter

LADDER_TAG = "qat-ladder"  # the tag qat-ladder puts on its runs (qat_assets.ladder.LADDER_TAG)


def step_times(instance: DagsterInstance, run_id: str) -> dict[str, dict[str, float]]:
    steps: dict[str, dict[str, float]] = defaultdict(dict)
    for record in instance.get_records_for_run(run_id).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if entry.step_key is None or event is None:
            continue
        times = steps[entry.step_key]
        if event.event_type == DagsterEventType.STEP_WORKER_STARTING:
            times["worker_starting"] = entry.timestamp
        elif event.event_type == DagsterEventType.STEP_WORKER_STARTED:
            times["worker_started"] = entry.timestamp
        elif event.event_type == DagsterEventType.STEP_START:
            times["start"] = entry.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            times["end"] = entry.timestamp
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            wall = entry.asset_materialization.metadata.get("wall_time_s")
            if wall is not None:
                times["heavy"] = float(wall.value)
    return steps


def main() -> None:
    process_start: dict[str, list[float]] = defaultdict(list)
    step_overhead: dict[str, list[float]] = defaultdict(list)
    with DagsterInstance.get() as instance:
        records = instance.get_run_records(RunsFilter(tags={LADDER_TAG: "true"}), ascending=True)
        print(f"{'run':<40} {'queued s':>8} {'wall s':>7} {'heavy s':>7} {'overhead s':>10}")
        total_wall = total_heavy = 0.0
        for record in records:
            if record.start_time is None or record.end_time is None:
                continue
            run = record.dagster_run
            steps = step_times(instance, run.run_id)
            heavy = sum(times.get("heavy", 0.0) for times in steps.values())
            wall = record.end_time - record.start_time
            queued = record.start_time - record.create_timestamp.timestamp()
            total_wall, total_heavy = total_wall + wall, total_heavy + heavy
            label = f"{run.job_name} {run.tags.get('dagster/partition', '')}"
            print(f"{label:<40} {queued:8.1f} {wall:7.1f} {heavy:7.1f} {wall - heavy:10.1f}")
            for key, times in steps.items():
                kind = key.split("__")[-1]
                if "worker_starting" in times and "worker_started" in times:
                    process_start[kind].append(times["worker_started"] - times["worker_starting"])
                if "start" in times and "end" in times:
                    step_overhead[kind].append(times["end"] - times["start"] - times.get("heavy", 0.0))
        print(f"{'sum over runs':<40} {'':>8} {total_wall:7.1f} {total_heavy:7.1f} {total_wall - total_heavy:10.1f}")
    print(f"\n{'step':<24} {'n':>3} {'process start s (median)':>24} {'in-step overhead s (median)':>28}")
    for kind in sorted(step_overhead):
        starts = process_start.get(kind)
        start_text = f"{statistics.median(starts):.1f}" if starts else "in process"
        print(f"{kind:<24} {len(step_overhead[kind]):>3} {start_text:>24} {statistics.median(step_overhead[kind]):>28.1f}")


if __name__ == "__main__":
    main()
